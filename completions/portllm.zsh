
#compdef portllm

_portllm_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PORTLLM_COMPLETE=complete_zsh portllm)
}

compdef _portllm_completion portllm

