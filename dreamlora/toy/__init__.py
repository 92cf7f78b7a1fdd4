"""The built-in toy world and the small Stable-Diffusion-shaped model pretrained on it.

`world` draws and reads synthetic scenes (coloured shapes on pastel backgrounds);
`pretrain` trains the shipped model in `dreamlora/assets/toy` on those scenes.
"""
