"""Conversation data for SFT: generated and file sources (`generated`), mixtures (`mixture`) and
the packed, masked rows the trainer reads (`rows`)."""
