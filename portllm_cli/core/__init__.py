"""portllm's core library: no typer, no rich; typed functions that raise PortllmError."""
