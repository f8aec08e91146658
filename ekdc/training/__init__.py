"""The one training loop (``trainer.train_stage``) and what it runs on: the device and precision
(``runtime``), the weight average (``ema``), and the stages trained outside distill (``qad_stage``:
quantization-aware distillation of an exported student). Below ``deploy`` and ``distillation``, which
both train through it."""
