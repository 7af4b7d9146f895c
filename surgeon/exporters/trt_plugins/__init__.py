"""Sources that :mod:`surgeon.exporters.tensorrt` copies into TensorRT bundles.

``surgeon_runtime.py`` runs a ``surgeon::`` op for a TensorRT plugin (torch on the plugin's CUDA
stream, whose own dispatch picks the Triton block-sparse kernel); ``build_engine.py`` is the
standalone script that registers the plugins, parses the ONNX model, builds and saves the engine
and checks it against onnxruntime. The plugin registrations themselves (``surgeon_qdp.py``) are
generated per model by :func:`surgeon.exporters.tensorrt.plugin_source`. Neither file imports
TensorRT at import time, so they load (and are tested) on machines without it.
"""
