"""Stage one: dataset readers, the encoder registry, and the batched extraction loop."""
