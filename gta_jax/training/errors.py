"""The error raised when saved weights do not fit the model a config describes.

It lives apart from `checkpoint` (which re-exports it) so that the modules that raise
it stay in one direction: `checkpoint` -> `state` -> `finetune` -> `errors`.
"""


class IncompatibleCheckpointError(ValueError):
  """The checkpoint holds another model than the config describes."""
