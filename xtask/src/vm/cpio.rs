//! A newc ("070701") cpio archive, the format the kernel unpacks as its initramfs: a header of
//! hex fields, the NUL-terminated name and the data, each padded to 4 bytes.

pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const SYMLINK: u32 = 0o120_000;
const CHAR_DEV: u32 = 0o020_000;

impl Cpio {
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.entry(path, DIR | 0o755, &[], (0, 0));
    }

    pub fn file(&mut self, path: &str, data: &[u8], executable: bool) {
        let perm = if executable { 0o755 } else { 0o644 };
        self.entry(path, FILE | perm, data, (0, 0));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, SYMLINK | 0o777, target.as_bytes(), (0, 0));
    }

    /// /dev/console must exist before devtmpfs is mounted: the kernel opens it for init's stdio.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, CHAR_DEV | 0o600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = path.trim_start_matches('/');
        let nlink = if mode & 0o170_000 == DIR { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible archives
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.next_ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_and_aligned() {
        let mut c = Cpio::new();
        c.file("/init", b"#!/bin/sh\n", true);
        let bytes = c.finish();
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.len().is_multiple_of(4));
        // The mode field (second) of a 0755 regular file.
        assert_eq!(&bytes[14..22], b"000081ed");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}
