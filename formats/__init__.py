"""Dataset formats: what a preference dataset holds in memory (records.py), the published on-disk layouts that
become those records (layouts.py: ImageReward, HPDv2, Rapidata, Pick-a-Pic), and reading their images, checked
(images.py). data.py is built on these; nothing here imports a file of the method."""
