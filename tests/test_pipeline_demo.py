"""The web page of scripts/demo.py: its generate step, and the page itself in a real headless browser (Debian's
chromium + chromium-driver, which .ci/run installs): pick a class, press generate, see an image of the right size."""
import os
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT
from libs.pipeline import DiMPipeline
from libs.pipeline.demo import build_demo, generate
from tiny_pipeline import write_digits_run

CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    return write_digits_run(str(tmp_path_factory.mktemp('digits')))


def test_generate_makes_the_picked_classes_and_says_how_long_it_took(digits):
    pipe = DiMPipeline.from_pretrained(digits['pipeline'])
    images, line = generate(pipe, ['7', '3'], 2, seed=5, steps=2, guidance_scale=4.0)
    assert [im.size for im in images] == [(16, 16)] * 4
    assert line.startswith('4 images of 16x16 px in ') and line.endswith('on cpu (seed 5, 2 steps, guidance_scale 4)')
    again, _ = generate(pipe, ['7', '3'], 2, seed=5, steps=2, guidance_scale=4.0)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    with pytest.raises(ValueError, match='pick at least one class'):
        generate(pipe, [], 1, seed=0, steps=2, guidance_scale=1.0)
    pytest.importorskip('gradio')
    demo = build_demo(pipe)
    assert {'classes', 'generate', 'images', 'timing'} <= {getattr(b, 'elem_id', None) for b in demo.blocks.values()}


def test_without_arguments_the_quick_start_model_or_how_to_make_it(digits, tmp_path, monkeypatch, capsys):
    script = runpy.run_path(str(ROOT / 'scripts' / 'demo.py'))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"no pipeline given and no digits model in workdir/digits_DiM_tiny/default: "
                                         r"train it with `python train_ldm_discrete.py "
                                         r"--config=configs/digits_DiM_tiny.py`"):
        script['load_pipeline'](script['parse_args']([]))
    (tmp_path / 'configs').symlink_to(ROOT / 'configs')
    for step in (600, 1200):
        folder = tmp_path / 'workdir' / 'digits_DiM_tiny' / 'default' / 'ckpts' / f'{step}.ckpt'
        folder.mkdir(parents=True)
        shutil.copy(digits['nnet'], folder / 'nnet_ema.pth')
    pipe = script['load_pipeline'](script['parse_args']([]))
    assert 'serving the digits model workdir/digits_DiM_tiny/default/ckpts/1200.ckpt/nnet_ema.pth' in \
        capsys.readouterr().out
    assert pipe.labels == [str(k) for k in range(10)] and pipe.vae is None
    with pytest.raises(ValueError, match='--config and --nnet_path go together'):
        script['load_pipeline'](script['parse_args'](['--config', 'c.py']))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_page(url, server, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"scripts/demo.py exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no page at {url} after {timeout} s")


def headless_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                '--window-size=1280,1000'):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_page_in_a_browser(digits):
    pytest.importorskip('gradio', reason='the [demo] extra: pip install -e ".[demo]"')
    pytest.importorskip('selenium', reason='the [dev] extra: pip install -e ".[dev]"')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = f'http://127.0.0.1:{free_port()}/'
    server = subprocess.Popen([sys.executable, str(ROOT / 'scripts' / 'demo.py'), '--pipeline', digits['pipeline'],
                               '--port', url.split(':')[-1].strip('/')], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    try:
        wait_for_page(url, server)
        browser = headless_chromium()
        try:
            browser.get(url)
            wait = WebDriverWait(browser, 120)
            box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '#classes input'))
            browser.find_element(By.CSS_SELECTOR, '#classes .remove-all').click()    # drop the default class
            box.click()
            box.send_keys('7')
            option = wait.until(lambda b: [o for o in b.find_elements(By.CSS_SELECTOR, '[role=option]')
                                           if o.text.strip() == '7'])
            option[0].click()
            assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, '#classes .token')] == ['7']
            browser.find_element(By.CSS_SELECTOR, '#generate').click()
            size = 'return arguments[0].complete ? [arguments[0].naturalWidth, arguments[0].naturalHeight] : null'
            sizes = wait.until(lambda b: [s for s in (b.execute_script(size, im) for im in
                                                      b.find_elements(By.CSS_SELECTOR, '#images img')) if s])
            assert sizes == [[16, 16]]
            timing = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, '#timing').text)
            assert timing.startswith('1 images of 16x16 px in ') and 'on cpu' in timing
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)
