"""Tests for chatlm.data."""
