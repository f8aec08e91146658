# ekdc on an NVIDIA GPU: CUDA, TensorRT 10 (from the base image), PyTorch, ONNX Runtime with the CUDA
# and TensorRT execution providers.
#   docker build -t ekdc .
#   docker run --gpus all --rm -v "$PWD:/work" -w /work ekdc distill recipes/cifar10.yaml
#   docker run --gpus all --rm -v "$PWD:/work" -w /work ekdc export --fp16 --trt
FROM nvcr.io/nvidia/tensorrt:25.01-py3

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/ekdc
COPY pyproject.toml README.md ./
COPY ekdc ./ekdc
# TensorRT's Python bindings come with the base image; the GPU build of ONNX Runtime replaces the CPU one
RUN python3 -m pip install --no-cache-dir . \
 && python3 -m pip uninstall -y onnxruntime \
 && python3 -m pip install --no-cache-dir "onnxruntime-gpu>=1.18" \
 && python3 -c "import tensorrt, ekdc; print('tensorrt', tensorrt.__version__)"

RUN useradd --create-home --uid 1000 ekdc
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["ekdc"]
CMD ["--help"]
