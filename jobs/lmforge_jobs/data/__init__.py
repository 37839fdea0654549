"""The Corpus job: ``python -m lmforge_jobs.data --manifest corpus.yaml [--stage NAME|all] [--rank R --world W]``.

``config``    the spec model (CorpusSpec), from which the CRD is generated
``stages``    the stages in order (pure: the operator builds one Indexed Job per stage from it)
``layout``    where everything lives under spec.output
``preflight`` input checks before anything runs
``pipelines`` each stage as a datatrove pipeline (a table of list literals)
``run``       running one stage's ranks with datatrove's LocalPipelineExecutor
``stats``     stats.json
``job``       the job: stages in order, progress, outputs.json
``blocks``    the datatrove steps lmforge adds (readers, offline filters, domains, split, counts)
``tokenizer`` the byte-level BPE (or pretrained) tokenizer directory
``tokenize``  the token shards, and how to read them
"""
