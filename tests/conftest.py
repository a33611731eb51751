"""Shared pytest fixtures and settings."""

import os
import sys

# The configs/ folder holds recipe files that tests load by name.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
