"""Lightning: the callback, slim ``.ckpt`` files and their resume records, ``ckpt_path`` checks, distributed set-up."""
