#!/usr/bin/python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/), tiny files of every kind the readers know.
Needs PIL (Debian: python3-pil). Run from anywhere: python3 tests/fuzz/make_seeds.py"""
import pathlib
import struct
import zlib

from PIL import Image

corpus = pathlib.Path(__file__).resolve().parent / 'corpus'
images = corpus / 'fuzz_image'
images.mkdir(parents=True, exist_ok=True)
w, h = 5, 3
grey = Image.new('L', (w, h))
grey.putdata([i * 16 for i in range(w * h)])
rgb = Image.merge('RGB', (grey, grey.point(lambda v: 255 - v), grey.point(lambda v: v // 2)))
grey16 = Image.new('I;16', (w, h))
grey16.putdata([i * 4000 for i in range(w * h)])
for name, image, options in [('grey8.png', grey, {}), ('rgb8.png', rgb, {}), ('rgba8.png', rgb.convert('RGBA'), {}),
                             ('grey1.png', grey.convert('1'), {}), ('palette.png', rgb.convert('P'), {}),
                             ('grey16.png', grey16, {}), ('grey.jpg', grey, {'quality': 90}),
                             ('rgb.jpg', rgb, {'quality': 90}), ('progressive.jpg', rgb, {'progressive': True}),
                             ('rgb.bmp', rgb, {}), ('grey.bmp', grey, {}), ('rgb.gif', rgb, {}), ('rgb.tga', rgb, {}),
                             ('grey.tga', grey, {}), ('grey.pgm', grey, {}), ('rgb.ppm', rgb, {})]:
    image.save(images / name, **options)


def png(depth, colour, interlace, raw):
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', w, h, depth, colour, 0, 0, interlace)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b'')


# What PIL cannot write: 16-bit RGB PNG, Adam7-interlaced PNG, 16-bit PGM and PSD.
rows16 = b''.join(b'\0' + b''.join(struct.pack('>HHH', (x + y) * 3000, x * 9000, y * 20000) for x in range(w))
                  for y in range(h))
(images / 'rgb16.png').write_bytes(png(16, 2, 0, rows16))
raw = b''
for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]:
    xs, ys = range(x0, w, dx), range(y0, h, dy)
    if len(xs) and len(ys):
        raw += b''.join(b'\0' + bytes(grey.getpixel((x, y)) for x in xs) for y in ys)
(images / 'interlaced.png').write_bytes(png(8, 0, 1, raw))
(images / 'grey16.pgm').write_bytes(b'P5\n%d %d\n65535\n' % (w, h) + b''.join(struct.pack('>H', v) for v in grey16.getdata()))
planes = b''.join(bytes(channel.getdata()) for channel in rgb.split())
(images / 'rgb.psd').write_bytes(b'8BPS' + struct.pack('>H6xHIIHH', 1, 3, h, w, 8, 3) + bytes(12) + bytes(2) + planes)

labels = corpus / 'fuzz_yolo_labels'
labels.mkdir(parents=True, exist_ok=True)
(labels / 'boxes.txt').write_bytes(b'0 0.5 0.5 0.25 0.125\n2  0.1 0.9\t0.05 0.2\n')
(labels / 'crlf.txt').write_bytes(b'\xef\xbb\xbf1 1e-1 +0.5 .25 1.\r\n\r\n0 0 0 0 0')
(labels / 'blank.txt').write_bytes(b'\n \n\t\n')
(labels / 'bad.txt').write_bytes(b'3 0.5 nan -0.1 0x1p-2 1e999\n')
