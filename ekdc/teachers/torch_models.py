"""Teachers built in PyTorch, from three places: ekdc's registry (``resnet56``), torchvision
(``torchvision:resnet50``) and timm (``timm:convnext_nano``).

Each family answers the same questions: is the name known (and which names are close), build the
network, where is its final Linear (to re-head it and to read features at its input), and what input
size and normalisation the model itself expects.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import socket
from typing import Optional, Union

import torch.nn as nn

from ..contract import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError

PREFIXES = {"torchvision": "torchvision:", "timm": "timm:"}
DOWNLOAD_TIMEOUT_S = 60  # a download that stalls must end, not hang the run


def parse_arch(arch: str) -> tuple[str, str]:
    """``"timm:resnet50.a1_in1k"`` -> ``("timm", "resnet50.a1_in1k")``; a bare name is the registry's."""
    for source, prefix in PREFIXES.items():
        if arch.startswith(prefix):
            return source, arch[len(prefix):]
    return "registry", arch


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def check_arch(arch: str) -> None:
    """For the recipe schema: a ValueError (one line, closest names suggested) for an unknown name."""
    source, name = parse_arch(arch)
    if source == "registry":
        from ..models import check_model_name

        check_model_name(name)
        return
    if source == "torchvision":
        known, base = _torchvision_names(), name
    else:
        known, base = _timm_names(), name.split(".", 1)[0]  # timm names may carry a weights tag
    if base not in known:
        close = difflib.get_close_matches(base, known, n=3)
        hint = f" (closest: {', '.join(PREFIXES[source] + c for c in close)})" if close else ""
        raise ValueError(f"unknown {source} model '{name}'{hint}")
    if source == "timm" and "." in name:
        import timm

        tags = timm.list_pretrained(base + ".*")
        if name not in tags:
            raise ValueError(f"timm has no weights tagged '{name}' (it has {', '.join(tags[:6]) or 'none'})")


def search(pattern: str = "*") -> dict[str, list[str]]:
    """Names matching a shell-style pattern (case-insensitive; a bare word matches anywhere) in each
    family, as ``timm.list_models`` filters; ``torchvision:`` or ``timm:`` in front searches that family
    only, and a pattern with a ``.`` also searches timm's tagged weights (``resnet50.a1_in1k``)."""
    from ..models import list_models

    pat = pattern.strip().lower()
    only = next((src for src, pre in PREFIXES.items() if pat.startswith(pre)), None)
    pat = pat[len(PREFIXES[only]):] if only else pat
    pat = pat if any(c in pat for c in "*?[") else f"*{pat}*"
    match = lambda names: [n for n in names if fnmatch.fnmatchcase(n.lower(), pat)]  # noqa: E731
    found = {"registry": [] if only else match(list_models()),
             "torchvision": [] if only == "timm" else [PREFIXES["torchvision"] + n for n in match(_torchvision_names())]}
    try:
        import timm

        names = _timm_names() + (timm.list_pretrained() if "." in pat else [])
        found["timm"] = [] if only == "torchvision" else [PREFIXES["timm"] + n for n in match(names)]
    except ImportError:
        found["timm"] = []
    return found


# --------------------------------------------------------------------------------------------------
# building


@contextlib.contextmanager
def _bounded_download(what: str, name: str):
    """The libraries' own download and cache, with a time limit; failures become one line."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - urllib, huggingface_hub and ssl each raise their own types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:140]
        raise UserError(f"{what}: could not get the pretrained weights of {name} ({reason}); offline, download "
                        "them where there is a network and point weights: at the file") from None
    finally:
        socket.setdefaulttimeout(old)


def build(arch: str, num_classes: Optional[int], pretrained: Union[bool, str], what: str) -> nn.Module:
    """The network, with the library's pretrained weights if asked for. ``num_classes`` None keeps the
    library's default head (1000 ImageNet classes) for a later re-head or weight file."""
    source, name = parse_arch(arch)
    if source == "registry":
        from ..models import create_model

        return create_model(name, num_classes=num_classes or 10)
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        import torchvision

        weights = None
        if pretrained:
            enum = torchvision.models.get_model_weights(name)
            try:
                weights = enum.DEFAULT if pretrained is True else enum[pretrained]
            except KeyError:
                raise UserError(f"{what}: torchvision has no weights '{pretrained}' for {name} (it has "
                                f"{', '.join(w.name for w in enum)})") from None
        with _bounded_download(what, arch) if weights else contextlib.nullcontext():
            model = torchvision.models.get_model(name, weights=weights)
        _check_plain_classifier(model, arch, what)
        return model if num_classes is None else reset_head(model, num_classes, source)
    import timm

    with _bounded_download(what, arch) if pretrained else contextlib.nullcontext(), \
            _hub_offline_unless_reachable() if pretrained else contextlib.nullcontext():
        return timm.create_model(name, pretrained=bool(pretrained), **kw)


@contextlib.contextmanager
def _hub_offline_unless_reachable(timeout: float = 3.0):
    """timm's weights come from the Hugging Face hub, whose client retries an unreachable host for
    minutes, logging each try. When the hub does not answer within ``timeout``, use its cache only
    (offline mode): cached weights still load, and missing ones fail at once. The client's own log
    stays quiet either way: the failure is said in one line."""
    import os
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hf_logging

    was_offline, level = constants.HF_HUB_OFFLINE, hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if not was_offline:
            try:
                socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
            except OSError:
                constants.HF_HUB_OFFLINE = True
                os.environ["HF_HUB_OFFLINE"] = "1"
        yield
    finally:
        if not was_offline:
            constants.HF_HUB_OFFLINE = False
            os.environ.pop("HF_HUB_OFFLINE", None)
        hf_logging.set_verbosity(level)


def _check_plain_classifier(model: nn.Module, arch: str, what: str) -> None:
    if getattr(model, "aux_logits", False) or getattr(model, "AuxLogits", None) is not None:
        raise UserError(f"{what}: {arch} returns auxiliary outputs while training; ekdc runs plain classifiers "
                        "(one logits tensor): choose another model")
    if final_linear(model, "torchvision") is None:
        raise UserError(f"{what}: {arch} has no final Linear layer, so ekdc cannot re-head it or read its features: "
                        "choose another model")


def final_linear(model: nn.Module, source: str) -> Optional[nn.Linear]:
    """The classifier's final Linear: timm's ``get_classifier()``, registry's ``fc``, torchvision's last Linear."""
    if source == "timm":
        head = model.get_classifier()
        return head if isinstance(head, nn.Linear) else None
    if source == "registry":
        return model.fc if isinstance(getattr(model, "fc", None), nn.Linear) else None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def reset_head(model: nn.Module, num_classes: int, source: str) -> nn.Module:
    """A new, freshly initialised final Linear with ``num_classes`` outputs, in place: every other weight is
    kept (a teacher fine-tuned from weights on data of other classes starts from what it learnt)."""
    if source == "timm":
        model.reset_classifier(num_classes)
        return model
    head = final_linear(model, source)
    owner, attr = _parent_of(model, head)
    # the same kind of Linear (FastNet's head has no bias), on the same device
    setattr(owner, attr, nn.Linear(head.in_features, num_classes, bias=head.bias is not None,
                                   device=head.weight.device, dtype=head.weight.dtype))
    return model


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        if module is target:
            path = name.split(".")
            owner = model
            for part in path[:-1]:
                owner = getattr(owner, part)
            return owner, path[-1]
    raise ValueError("module not found in model")


def own_preprocessing(arch: str, pretrained: Union[bool, str], model: nn.Module) -> Optional[tuple[int, list, list]]:
    """(input size, mean, std) the model itself expects: timm's ``pretrained_cfg``, torchvision's
    weights meta (of the named weights, else the model's default weights); None for the registry."""
    source, name = parse_arch(arch)
    if source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" in cfg:
            return int(cfg["input_size"][-1]), list(cfg.get("mean", IMAGENET_MEAN)), list(cfg.get("std", IMAGENET_STD))
        return None
    if source == "torchvision":
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(name)
            w = enum[pretrained] if isinstance(pretrained, str) else enum.DEFAULT
            t = w.transforms()
            return int(t.crop_size[0]), list(t.mean), list(t.std)
        except (ValueError, KeyError, AttributeError, TypeError):
            return None
    return None
