"""The run's configuration: RunConfig (model + data + training_config + peft_config, speed, rewards) read from YAML
with --set overrides and checked all at once (schema), the value types (types), and what each method adds (methods)."""
