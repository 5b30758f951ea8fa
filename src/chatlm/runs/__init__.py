"""Reading run directories: sweep summaries now, `chatlm runs ...` tooling later."""
