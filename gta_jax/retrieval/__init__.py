"""Text-video retrieval: embeddings of captions and videos, their losses and metrics."""
