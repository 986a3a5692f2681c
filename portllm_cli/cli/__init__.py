"""The command line: thin typer modules over portllm_cli.core."""
