"""`phitune ui`: the whole loop (configure, check the data, train, compare runs, chat) on a local web page.

Built on Gradio (the convention of the field: LLaMA-Factory's LlamaBoard is Gradio too), installed with the `ui`
extra. The page calls the functions the CLI calls and trains by running `phitune train` as its own process, so it
never holds a training model. Modules: workspace (the folders and the config checker), runs (reading run
directories, starting and stopping training), views (HTML and SVG), chat (side-by-side chat), guard (who may talk
to the page: its own address, with this start's token), app (the page). Only `app` imports gradio.
"""
