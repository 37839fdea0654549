"""The Corpus job: ``python -m lmforge_jobs.data --manifest corpus.yaml [--stage NAME|all] [--rank R --world W]``.

``config``    the spec model (CorpusSpec), from which the CRD is generated
``stages``    the stages in order (pure: the operator builds one Indexed Job per stage from it)
``pipeline``  a stage as datatrove pipelines; output layout; stats.json
``blocks``    the datatrove steps lmforge adds (readers, offline filters, domains, split, counts)
``tokenizer`` the byte-level BPE (or pretrained) tokenizer directory
``tokenize``  the token shards, and how to read them
"""
