"""Interoperation with other libraries and formats: export (a merged model, Hugging Face and
sentence-transformers folders: ``python -m surm.export``) and PEFT's C3A adapters
(``python -m surm.interop.c3a``). The top layer: it may import every other one."""
