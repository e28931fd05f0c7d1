"""Pure model code: backbone, prompts and anchors, methods, losses, training loop,
checkpoints, thresholds, metrics, the pixel contract. Tensors in, scores and maps out; no
Kafka, no Redis. Imports nothing of linewatch outside scoring/.
"""
