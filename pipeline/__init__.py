"""The Ray pipeline: img2dataset shards -> CLIP embeddings and score columns in DataComp's layout.

    clipsift embed   shard mode      (embed.run_embed, config.EmbedConfig)
    clipsift score   metadata mode   (score.run_score, config.ScoreConfig)

decode.py is the CPU stage, encoders.py the models (Plan, Encoder), heads.py the score-head
registry, output.py the output folder (done markers, stats), raysession.py Ray and its CPUs.
docs/pipeline.md explains the design and every config key.
"""
