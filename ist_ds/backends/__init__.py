"""Backends that run IST inside a distributed training stack (DeepSpeed, FSDP2)."""
