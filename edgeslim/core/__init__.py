"""The leaves every package may import: errors, input specs, calibration data, config validation, safe
file writes, ONNX I/O helpers and the super-resolution model definitions. Nothing here imports from
outside edgeslim.core."""
