"""`llamatron plan`: per-GPU memory of a training job under each parallel layout, derived from the model's
own forward and the trainer's FSDP2 / AC / offload machinery (memory.py); which layouts fit and which is
expected fastest (layouts.py, speed.py); and extrapolation from a run measured at reduced depth
(extrapolate.py). Pure functions over LlamaConfig: nothing here touches a GPU or torch.distributed."""
