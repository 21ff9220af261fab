"""What a person sees of a job: TensorBoard scalars and the progress bar (:mod:`.monitor`), console
logging (:mod:`.console`) and the report command (:mod:`.report`: the Markdown summary; :mod:`.run_data`:
a finished run read back; :mod:`.plots`: its figures)."""
