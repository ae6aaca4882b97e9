"""One module per training method; phitune.train's RECIPES maps `method:` to its module.

A recipe is a plain module with these functions, which the driver (phitune.train) calls in this order around the
lifecycle steps of phitune.run.lifecycle:

    load_data(cfg, tokenizer, plan)                          -> data (whatever the recipe's other functions take)
    build_config(cfg, data, plan)                            -> the TRL config (TrainingArguments subclass)
    load_model(cfg, plan)                                    -> (model, PEFT LoraConfig or None)
    make_trainer(cfg, model, tokenizer, data, peft_config, args) -> the Trainer
    evaluate_before(cfg, trainer, tokenizer, data, checkpoint) -> what evaluate_after compares with
    evaluate_after(cfg, trainer, tokenizer, data, before)    -> metrics
    data_metrics(cfg, data)                                  -> counts for metrics.json
    tidy_output(output_dir)                                  -> in finish, main process only, before the run is
                                                                marked finished: drop what the run must not leave
    evaluate_run(model_cfg, adapter, data_cfg, output_dir, *, use_eval_split, batch_size, num_generate, settings)
                                                             -> EvalResult (`phitune eval` on a run of this method)
    inspect_data(cfg, output, example_index)                 -> DataReport (`phitune data`)

No inheritance and no imports between recipes (tests/test_architecture.py checks the imports): what two recipes
share lives below them, in phitune.run.lifecycle.
"""
