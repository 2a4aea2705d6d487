"""Context extension at inference time: the LongRoPE2 factor search, XL3M segment-wise inference, FlashBack
appending and retrieval augmentation. The RoPE-scaling family itself (linear, dynamic, yarn, longrope, llama3)
lives in the model core (`llamalab.model.rope_types`), because checkpoints name it."""
