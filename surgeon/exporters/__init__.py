"""Export of rewritten models: ONNX (each ``surgeon::`` op as an ONNX function); see ``onnx_lowering``."""
