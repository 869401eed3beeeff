"""The persistor service: the model store, written atomically on disk."""
