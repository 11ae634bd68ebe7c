"""Neural networks of genlab (Flax NNX modules), with no dependency on the train loop."""
