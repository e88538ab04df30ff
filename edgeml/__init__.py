"""edgeml: an edge inference runtime for MQTT sensor streams and ONNX model versions."""

__version__ = "0.1.0"
