//! The one place that calls the C++ shim (shim/shim.cpp): load an archive, read its graph
//! description, copy tensor bytes out, free.
//!
//! `unsafe` is confined here (the workspace denies it elsewhere): the shim's C functions take
//! raw pointers. Every call is wrapped in a safe method whose invariants are local: the handle
//! is owned by [`Archive`] and freed once in `Drop`; strings the shim allocates are copied and
//! freed at once; destination buffers are Rust-owned with the exact length passed along.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

// Keep torch-sys linked: it carries the libtorch link flags the shim needs.
use torch_sys as _;

extern "C" {
    fn autopar_ts_load(
        path: *const c_char,
        json: *mut *mut c_char,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn autopar_ts_tensor_bytes(
        handle: *mut c_void,
        index: usize,
        dst: *mut u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn autopar_ts_set_tensor(
        handle: *mut c_void,
        index: usize,
        data: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn autopar_ts_forward(
        handle: *mut c_void,
        n: usize,
        dtypes: *const *const c_char,
        shapes: *const *const i64,
        ranks: *const usize,
        data: *const *const u8,
        lens: *const usize,
        err: *mut *mut c_char,
    ) -> *mut c_char;
    fn autopar_ts_output_bytes(
        handle: *mut c_void,
        index: usize,
        dst: *mut u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn autopar_ts_free(handle: *mut c_void);
    fn autopar_ts_free_string(s: *mut c_char);
}

/// Takes ownership of a string the shim allocated (may be null).
fn take_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc; we copy and free it once.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: `p` came from the shim's allocator and is not used after this.
    unsafe { autopar_ts_free_string(p) };
    Some(s)
}

/// A loaded TorchScript module held by libtorch.
pub struct Archive {
    handle: *mut c_void,
    /// The graph description (see `dump.rs`).
    pub json: String,
}

impl Archive {
    /// Loads `path` with `torch::jit::load` and describes its inlined `forward` graph.
    pub fn load(path: &Path) -> Result<Archive, String> {
        let cpath = path_to_cstring(path)?;
        let mut json: *mut c_char = std::ptr::null_mut();
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: `cpath` outlives the call; the out-pointers point to valid locals.
        let handle = unsafe { autopar_ts_load(cpath.as_ptr(), &mut json, &mut err) };
        let json = take_string(json);
        let err = take_string(err);
        if handle.is_null() {
            return Err(err.unwrap_or_else(|| "libtorch failed to load it".into()));
        }
        // own the handle at once, so it is freed on every path
        let mut archive = Archive {
            handle,
            json: String::new(),
        };
        match json {
            Some(json) => {
                archive.json = json;
                Ok(archive)
            }
            None => Err("libtorch returned no graph description".into()),
        }
    }

    /// The bytes (row-major, little-endian on the hosts libtorch supports) of tensor `index`
    /// of the description's table, which hold exactly `len` bytes.
    pub fn tensor_bytes(&self, index: usize, len: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: `self.handle` is live (freed only in Drop); `buf` has exactly `len` bytes.
        let rc =
            unsafe { autopar_ts_tensor_bytes(self.handle, index, buf.as_mut_ptr(), len, &mut err) };
        let err = take_string(err);
        if rc != 0 {
            return Err(err.unwrap_or_else(|| "libtorch could not copy the tensor".into()));
        }
        Ok(buf)
    }
}

/// One output of [`Archive::forward`]: c10 dtype name, shape, bytes.
pub type RawOutput = (String, Vec<i64>, Vec<u8>);

/// One input of [`Archive::forward`]: c10 dtype name, shape, row-major little-endian bytes.
pub struct RawTensor {
    pub dtype: &'static str,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

impl Archive {
    /// Replaces the data of tensor `index` of the table (every module attribute holding it
    /// sees the new values); `bytes` must be exactly its size.
    pub fn set_tensor(&mut self, index: usize, bytes: &[u8]) -> Result<(), String> {
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle is live; `bytes` is valid for `bytes.len()` reads.
        let rc = unsafe {
            autopar_ts_set_tensor(self.handle, index, bytes.as_ptr(), bytes.len(), &mut err)
        };
        let err = take_string(err);
        if rc != 0 {
            return Err(err.unwrap_or_else(|| "libtorch could not set the tensor".into()));
        }
        Ok(())
    }

    /// Runs the module's own `forward` on `inputs`; returns the flattened outputs as
    /// `(c10 dtype name, shape, bytes)`.
    pub fn forward(&self, inputs: &[RawTensor]) -> Result<Vec<RawOutput>, String> {
        let names: Vec<CString> = inputs
            .iter()
            .map(|t| CString::new(t.dtype).map_err(|_| "bad dtype name".to_string()))
            .collect::<Result<_, _>>()?;
        let dtypes: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
        let shapes: Vec<*const i64> = inputs.iter().map(|t| t.shape.as_ptr()).collect();
        let ranks: Vec<usize> = inputs.iter().map(|t| t.shape.len()).collect();
        let data: Vec<*const u8> = inputs.iter().map(|t| t.bytes.as_ptr()).collect();
        let lens: Vec<usize> = inputs.iter().map(|t| t.bytes.len()).collect();
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: every array has `inputs.len()` entries pointing into `inputs` / `names`,
        // which outlive the call; the handle is live.
        let json = unsafe {
            autopar_ts_forward(
                self.handle,
                inputs.len(),
                dtypes.as_ptr(),
                shapes.as_ptr(),
                ranks.as_ptr(),
                data.as_ptr(),
                lens.as_ptr(),
                &mut err,
            )
        };
        let json = take_string(json);
        let err = take_string(err);
        let Some(json) = json else {
            return Err(err.unwrap_or_else(|| "libtorch's forward failed".into()));
        };
        #[derive(serde::Deserialize)]
        struct Meta {
            dtype: String,
            shape: Vec<i64>,
        }
        let metas: Vec<Meta> =
            serde_json::from_str(&json).map_err(|e| format!("bad output description: {e}"))?;
        let mut outs = vec![];
        for (i, m) in metas.into_iter().enumerate() {
            let size = crate::dump::dtype_of(&m.dtype)
                .ok_or_else(|| format!("output {i} has dtype {}", m.dtype))?
                .size_bytes();
            let numel: i64 = m.shape.iter().product();
            let len = usize::try_from(numel).map_err(|_| "negative shape".to_string())? * size;
            let mut buf = vec![0u8; len];
            let mut err: *mut c_char = std::ptr::null_mut();
            // SAFETY: the handle is live; `buf` has exactly `len` bytes.
            let rc =
                unsafe { autopar_ts_output_bytes(self.handle, i, buf.as_mut_ptr(), len, &mut err) };
            let err = take_string(err);
            if rc != 0 {
                return Err(err.unwrap_or_else(|| "could not read an output".into()));
            }
            outs.push((m.dtype, m.shape, buf));
        }
        Ok(outs)
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        // SAFETY: the handle came from autopar_ts_load and is freed exactly once.
        unsafe { autopar_ts_free(self.handle) };
    }
}

#[cfg(unix)]
fn path_to_cstring(path: &Path) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| "the path contains a NUL byte".into())
}

#[cfg(not(unix))]
fn path_to_cstring(path: &Path) -> Result<CString, String> {
    let s = path
        .to_str()
        .ok_or_else(|| "the path is not valid UTF-8".to_string())?;
    CString::new(s).map_err(|_| "the path contains a NUL byte".into())
}
