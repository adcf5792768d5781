"""Test-wide settings: everything runs offline on the CPU."""
import os

# A hub call without this waits ~27 s to fail; nothing in the tests may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
