"""Data: document streams and the packers that turn token documents into training rows."""
