"""A trained vocabulary out of wakelab: a transformers folder, a PEFT adapter, an MLflow model, a GGUF file. App
layer."""
