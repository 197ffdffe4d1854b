/*
 * imgpipe.data._jpeg_region: one region of a JPEG decoded, and nothing below it.
 *
 * libjpeg-turbo's libjpeg API (jpeg_skip_scanlines, jpeg_crop_scanline; libjpeg-turbo >= 1.5)
 * at one of its n/8 DCT scales: the rows above the region are entropy-decoded only, the rows
 * below are not read at all, and the columns outside it (to the iMCU boundary at or left of
 * its left edge) skip the IDCT, the upsampling and the colour conversion. The wrapper with
 * the checks and the fallback is imgpipe.data.jpeg_region; docs/architecture.md says why.
 *
 * decode_region(data, height, width, top, left, bottom, right, scale_num, gray)
 *   data         the JPEG's bytes (any buffer); read only within its length
 *   height/width the size the caller's row records: a header that says otherwise is refused
 *                before anything is allocated for it
 *   top..right   the region, in the coordinates of the image scaled by scale_num/8
 *   scale_num    1..8
 *   gray         1: one channel (luma), 0: RGB
 * -> (bytearray, rows, columns, left_of_first_column): rows x columns x channels uint8, whose
 *    first column is column left_of_first_column of the scaled image (<= left).
 *
 * A warning from the decoder (corrupt data) is an error, as simplejpeg's strict mode makes it;
 * every error is a ValueError. The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

/* The widest iMCU of a scaled image is 4 (max h sampling) x 8 (DCT size) columns: the most
 * jpeg_crop_scanline widens a region by on its left. */
#define MAX_WIDENING 32

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *err = (error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo); /* a corrupt-data warning */
}

typedef struct {
    const unsigned char *data;
    unsigned long size;
    int height, width, top, left, bottom, right, scale_num, channels;
    unsigned char *out; /* rows x (right - left + MAX_WIDENING) x channels bytes */
    JDIMENSION first_column, columns;
    char message[JMSG_LENGTH_MAX];
} job;

/* Returns 0, or 1 with job->message set. Runs without the GIL. */
static int decode(job *j) {
    struct jpeg_decompress_struct cinfo;
    error_mgr jerr;
    volatile int failed = 0;

    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = on_error;
    jerr.pub.emit_message = on_message;
    jerr.message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    if (setjmp(jerr.jump)) {
        snprintf(j->message, sizeof j->message, "%s", jerr.message);
        failed = 1;
    } else {
        jpeg_mem_src(&cinfo, j->data, j->size);
        jpeg_read_header(&cinfo, TRUE);
        if ((int)cinfo.image_height != j->height || (int)cinfo.image_width != j->width) {
            snprintf(j->message, sizeof j->message, "a %ux%u JPEG, its row says %dx%d", cinfo.image_width, cinfo.image_height, j->width,
                     j->height);
            failed = 1;
        } else {
            cinfo.out_color_space = j->channels == 1 ? JCS_GRAYSCALE : JCS_RGB;
            cinfo.scale_num = (unsigned int)j->scale_num;
            cinfo.scale_denom = 8;
            cinfo.dct_method = JDCT_ISLOW;
            jpeg_start_decompress(&cinfo);
            if (j->bottom > (int)cinfo.output_height || j->right > (int)cinfo.output_width) {
                snprintf(j->message, sizeof j->message, "the region ends at %d,%d, past the %ux%u image at scale %d/8", j->right,
                         j->bottom, cinfo.output_width, cinfo.output_height, j->scale_num);
                failed = 1;
            } else {
                JDIMENSION first = (JDIMENSION)j->left, columns = (JDIMENSION)(j->right - j->left);
                JDIMENSION stride;
                if (columns < cinfo.output_width) jpeg_crop_scanline(&cinfo, &first, &columns);
                else first = 0;
                stride = columns * (JDIMENSION)j->channels;
                if (j->top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)j->top);
                while ((int)cinfo.output_scanline < j->bottom) {
                    JSAMPROW row = j->out + (size_t)(cinfo.output_scanline - (JDIMENSION)j->top) * stride;
                    jpeg_read_scanlines(&cinfo, &row, 1);
                }
                j->first_column = first;
                j->columns = columns;
            }
        }
    }
    jpeg_destroy_decompress(&cinfo); /* not jpeg_finish_decompress: nothing below the region is read */
    return failed;
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    job j;
    PyObject *out;
    int failed;
    size_t capacity;

    (void)self;
    memset(&j, 0, sizeof j);
    if (!PyArg_ParseTuple(args, "y*iiiiiiip", &data, &j.height, &j.width, &j.top, &j.left, &j.bottom, &j.right, &j.scale_num, &j.channels))
        return NULL;
    j.channels = j.channels ? 1 : 3;
    if (j.scale_num < 1 || j.scale_num > 8 || j.height < 1 || j.width < 1 || j.top < 0 || j.left < 0 || j.bottom <= j.top ||
        j.right <= j.left || j.bottom > j.height || j.right > j.width) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "no region %d,%d-%d,%d of a %dx%d image at scale %d/8", j.left, j.top, j.right, j.bottom,
                     j.width, j.height, j.scale_num);
        return NULL;
    }
    capacity = (size_t)(j.bottom - j.top) * (size_t)(j.right - j.left + MAX_WIDENING) * (size_t)j.channels;
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)capacity);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    j.data = (const unsigned char *)data.buf;
    j.size = (unsigned long)data.len;
    j.out = (unsigned char *)PyByteArray_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    failed = decode(&j);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (failed) {
        Py_DECREF(out);
        PyErr_Format(PyExc_ValueError, "JPEG: %s", j.message);
        return NULL;
    }
    if (PyByteArray_Resize(out, (Py_ssize_t)((size_t)(j.bottom - j.top) * j.columns * (size_t)j.channels)) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(NiII)", out, j.bottom - j.top, j.columns, j.first_column);
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS, "decode_region(data, height, width, top, left, bottom, right, scale_num, gray)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region", "One region of a JPEG decoded (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
