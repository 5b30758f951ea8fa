"""Tests for chatlm.tokenizer."""
