"""The local web page of scripts/demo.py (Gradio, the `[demo]` extra): pick classes by name, seed, steps and
guidance, and see the images with the time they took. Every asset is served locally (system fonts, no CDN).

    serve(pipe, host='127.0.0.1', port=7860)          # pipe: a DiMPipeline; blocks until interrupted
"""
import os
import time

import torch

__all__ = ['generate', 'build_demo', 'serve']

MAX_PER_CLASS = 8


def generate(pipe, classes, per_class, seed, steps, guidance_scale):
    """(PIL images, a line saying what was made and how long it took) for the page; `classes` are names (or ids),
    an unconditional model makes `per_class` images."""
    per_class, seed, steps = int(per_class), int(seed), int(steps)
    if pipe.config.conditional:
        if not classes:
            raise ValueError('pick at least one class')
        request = dict(class_labels=[c for c in classes for _ in range(per_class)])
    else:
        request = dict(num_images=per_class)
    start = time.perf_counter()
    images = pipe(**request, guidance_scale=float(guidance_scale), num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed)).images
    seconds = time.perf_counter() - start
    device = pipe.transformer.device
    return images, (f"{len(images)} images of {images[0].width}x{images[0].height} px in {seconds:.2f} s on "
                    f"{device} (seed {seed}, {steps} steps, guidance_scale {float(guidance_scale):g})")


def build_demo(pipe, title='DiM: Diffusion Mamba'):
    """The Gradio Blocks page of `pipe`. Element ids for scripted use: classes, per-class, seed, steps, guidance,
    generate, images, timing."""
    import gradio as gr

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}")
        labels = pipe.labels or [str(k) for k in range(pipe.transformer.num_classes)]
        with gr.Row():
            classes = gr.Dropdown(labels, value=[labels[0]], multiselect=True, label='classes', elem_id='classes',
                                  visible=pipe.config.conditional)
            per_class = gr.Slider(1, MAX_PER_CLASS, value=1, step=1, label='images per class', elem_id='per-class')
        with gr.Row():
            seed = gr.Number(0, precision=0, label='seed', elem_id='seed')
            steps = gr.Slider(1, 100, value=pipe.config.num_inference_steps, step=1, label='steps', elem_id='steps')
            guidance = gr.Slider(1.0, 10.0, value=pipe.config.guidance_scale, step=0.1,
                                 label='guidance scale (1: none)', elem_id='guidance')
        button = gr.Button('generate', variant='primary', elem_id='generate')
        images = gr.Gallery(label='images', format='png', columns=MAX_PER_CLASS, elem_id='images')
        timing = gr.Markdown(elem_id='timing')
        button.click(lambda *args: generate(pipe, *args), inputs=[classes, per_class, seed, steps, guidance],
                     outputs=[images, timing])
    return demo


def serve(pipe, host='127.0.0.1', port=7860):
    """Serve the page of `pipe` at http://host:port until interrupted; no usage analytics, system fonts only."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    import gradio as gr

    theme = gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                              font_mono=['ui-monospace', 'monospace'])
    build_demo(pipe).launch(server_name=host, server_port=port, theme=theme, show_error=True)
