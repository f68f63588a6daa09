//! Reading and writing the small files a run trusts: every file read here must be a regular file
//! (a FIFO would block forever, a device such as /dev/zero never ends) no larger than what its
//! kind of file can reasonably be, and every output must be absent or a regular file that is not
//! one of the run's inputs. Refusals are errors naming the file.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// A kind of file we read, with the largest size it can reasonably have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A tuning cache (a few hundred measurements of a few hundred bytes each).
    TuningCache,
    /// A WGSL source or include.
    Shader,
    /// A metrics file of `train --metrics` (a line of ~150 bytes per logged step).
    Metrics,
    /// A JSON file of a checkpoint (trainer_state.json, config.json).
    Json,
}

const MIB: u64 = 1 << 20;

impl Kind {
    /// The largest size accepted, in bytes.
    pub fn cap(self) -> u64 {
        match self {
            Kind::TuningCache => 16 * MIB,
            Kind::Shader => MIB,
            Kind::Metrics => 256 * MIB,
            Kind::Json => 16 * MIB,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::TuningCache => "tuning cache",
            Kind::Shader => "shader source",
            Kind::Metrics => "metrics file",
            Kind::Json => "JSON file",
        }
    }
}

/// What a file that is not a regular file is, in words.
fn describe(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        } else if t.is_char_device() || t.is_block_device() {
            return "a device";
        } else if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

fn refused(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message)
}

/// Checks that `meta` is a regular file of at most `kind`'s cap.
fn check_meta(meta: &Metadata, kind: Kind) -> std::io::Result<()> {
    if !meta.is_file() {
        return Err(refused(format!(
            "is {}, not a regular file; a {} must be one",
            describe(meta),
            kind.name()
        )));
    }
    if meta.len() > kind.cap() {
        return Err(refused(format!(
            "holds {} bytes, more than a {} can ({} bytes)",
            meta.len(),
            kind.name(),
            kind.cap()
        )));
    }
    Ok(())
}

/// The bytes of `path`, a regular file of at most `kind`'s cap. A missing file keeps its
/// `NotFound` kind; a refusal is `InvalidInput` with the reason (the caller names the file).
pub fn read_bytes(path: &Path, kind: Kind) -> std::io::Result<Vec<u8>> {
    // Looked at before opening: opening a FIFO for reading blocks until a writer comes.
    check_meta(&std::fs::metadata(path)?, kind)?;
    let file = File::open(path)?;
    // The file may have been swapped between the look and the open.
    check_meta(&file.metadata()?, kind)?;
    let mut bytes = Vec::new();
    file.take(kind.cap() + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > kind.cap() {
        return Err(refused(format!(
            "grew past the {} bytes a {} can hold while being read",
            kind.cap(),
            kind.name()
        )));
    }
    Ok(bytes)
}

/// The text of `path` (see `read_bytes`); text that is not UTF-8 is `InvalidData`.
pub fn read_text(path: &Path, kind: Kind) -> std::io::Result<String> {
    String::from_utf8(read_bytes(path, kind)?).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is not UTF-8 text ({e})"),
        )
    })
}

/// `read_text`, its error naming the file.
pub fn read(path: &Path, kind: Kind) -> Result<String> {
    read_text(path, kind).map_err(|e| Error::io(path, e))
}

/// Whether `a` and `b` name the same existing file (through links and other spellings).
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Checks an output file before anything is computed: `path` (given as `flag`) must be absent
/// or a regular file (a symbolic link is written through to its target, which must be one too),
/// must not be one of `inputs`, and its directory must exist.
pub fn check_output(path: &Path, flag: &str, inputs: &[&Path]) -> Result<()> {
    let name = path.display().to_string();
    if let Some(input) = inputs.iter().find(|i| same_file(path, i)) {
        return Err(Error::invalid(
            flag,
            format!(
                "{name} is an input of this run ({}); writing it would destroy it",
                input.display()
            ),
        ));
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(meta) => Err(Error::invalid(
            flag,
            format!(
                "{name} is {}; it needs a regular file (or a path that does not exist yet)",
                describe(&meta)
            ),
        )),
        Err(_) if std::fs::symlink_metadata(path).is_ok() => Err(Error::invalid(
            flag,
            format!("{name} is a symbolic link that leads nowhere"),
        )),
        Err(_) => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            match parent {
                Some(p) if !p.is_dir() => Err(Error::invalid(
                    flag,
                    format!("{name}: its directory {} does not exist", p.display()),
                )),
                _ => Ok(()),
            }
        }
    }
}

/// Where to write `path`: the target of a symbolic link (so that the link stays one), else
/// `path` itself.
pub fn write_target(path: &Path) -> std::path::PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("sf-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_without_reading() {
        let dir = scratch("kinds");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (path, what) in [
            (Path::new("/dev/zero"), "a device"),
            (dir.as_path(), "a directory"),
            (fifo.as_path(), "a FIFO"),
        ] {
            let e = read(path, Kind::Metrics).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains(what),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_over_its_kind_s_cap_is_refused() {
        let dir = scratch("cap");
        let big = dir.join("big.wgsl");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(Kind::Shader.cap() + 1)
            .unwrap();
        let e = read(&big, Kind::Shader).unwrap_err().to_string();
        assert!(e.contains("big.wgsl") && e.contains("more than"), "{e}");
        std::fs::write(&big, "fn f() {}").unwrap();
        assert_eq!(read(&big, Kind::Shader).unwrap(), "fn f() {}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn outputs_that_are_inputs_or_not_files_are_refused() {
        let dir = scratch("out");
        let data = dir.join("data.txt");
        std::fs::write(&data, "x").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        let e = check_output(&link, "--metrics", &[&data]).unwrap_err();
        assert!(e.to_string().contains("--metrics"), "{e}");
        assert!(check_output(&data, "--out", &[]).is_ok());
        assert!(check_output(&dir.join("new"), "--out", &[&data]).is_ok());
        for bad in [dir.as_path(), Path::new("/dev/null")] {
            assert!(
                check_output(bad, "--out", &[]).is_err(),
                "{}",
                bad.display()
            );
        }
        assert!(check_output(&dir.join("no/such"), "--out", &[]).is_err());
        assert_eq!(write_target(&link), std::fs::canonicalize(&data).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
