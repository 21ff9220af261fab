"""What a person sees of a job: TensorBoard scalars and the progress bar (:mod:`.monitor`), console
logging (:mod:`.console`) and the report command's plots and tables (:mod:`.report`)."""
