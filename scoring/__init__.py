"""Pure model code: tensors in, scores and anomaly maps out. No Kafka, no Redis."""
