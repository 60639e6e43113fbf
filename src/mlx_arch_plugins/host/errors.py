"""Errors an architecture raises that the host knows how to complete."""


class CheckpointError(ValueError):
    """A tensor of a checkpoint does not fit the model.

    ``tensor`` is the tensor's name in the checkpoint, so that the host's ``load_model``
    patch can add the shard file it came from (``sanitize`` sees tensors, not files).
    """

    def __init__(self, tensor: str, message: str):
        super().__init__(f"tensor {tensor!r}: {message}")
        self.tensor = tensor
        self.detail = message

    def in_file(self, where: str) -> "CheckpointError":
        """The same error, naming where the tensor was found."""
        return type(self)(self.tensor, f"{self.detail} (in {where})")
