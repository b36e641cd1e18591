//! Reader for the official Fashion-MNIST files (Xiao, Rasul & Vollgraf 2017).
//!
//! The data set is four gzip-compressed IDX files: 60,000 training and
//! 10,000 test images of 28×28 unsigned bytes, and their labels 0..9. An IDX
//! file is a big-endian header followed by the raw bytes:
//!
//! ```text
//! images: u32 magic = 0x0000_0803 (2051), u32 count, u32 rows = 28, u32 cols = 28,
//!         count·rows·cols u8 pixels, image by image, row by row
//! labels: u32 magic = 0x0000_0801 (2049), u32 count, count u8 labels
//! ```
//!
//! [`load`] verifies the SHA-256 of each compressed file against the official
//! files, checks the headers, and returns the first n images as f64 pixels
//! `p / 255 ∈ [0, 1]` (n×784 row-major) with their labels.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};

use crate::{ModelError, Result};

/// Image height in pixels.
pub const ROWS: usize = 28;
/// Image width in pixels.
pub const COLS: usize = 28;
/// Pixels per image, `ROWS · COLS`.
pub const PIXELS: usize = ROWS * COLS;
/// Class names, indexed by label.
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// IDX magic number of an image file (unsigned bytes, 3 dimensions).
const IMAGES_MAGIC: u32 = 2051;
/// IDX magic number of a label file (unsigned bytes, 1 dimension).
const LABELS_MAGIC: u32 = 2049;

// SHA-256 of the official gzip files, computed with `sha256sum` from the
// copies in /work/shared/data/fashion-mnist (whose MD5s match the upstream
// README; see data/fashion-mnist/SOURCE.md).
const TRAIN_IMAGES_SHA256: &str =
    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84";
const TRAIN_LABELS_SHA256: &str =
    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845";
const TEST_IMAGES_SHA256: &str = "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073";
const TEST_LABELS_SHA256: &str = "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5";

/// Which half of Fashion-MNIST to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The 60,000 training examples (`train-*-ubyte.gz`).
    Train,
    /// The 10,000 test examples (`t10k-*-ubyte.gz`).
    Test,
}

impl Split {
    /// The number of examples in the split (60,000 or 10,000).
    pub fn num_examples(self) -> usize {
        match self {
            Split::Train => 60_000,
            Split::Test => 10_000,
        }
    }

    /// File names and SHA-256 checksums: `((images, sha), (labels, sha))`.
    fn files(self) -> ((&'static str, &'static str), (&'static str, &'static str)) {
        match self {
            Split::Train => (
                ("train-images-idx3-ubyte.gz", TRAIN_IMAGES_SHA256),
                ("train-labels-idx1-ubyte.gz", TRAIN_LABELS_SHA256),
            ),
            Split::Test => (
                ("t10k-images-idx3-ubyte.gz", TEST_IMAGES_SHA256),
                ("t10k-labels-idx1-ubyte.gz", TEST_LABELS_SHA256),
            ),
        }
    }
}

/// The first n examples of a Fashion-MNIST split.
#[derive(Debug, Clone, PartialEq)]
pub struct FashionMnist {
    /// Number of examples n.
    pub n: usize,
    /// Pixels scaled to [0, 1] (byte / 255), n×784 row-major; each image is
    /// stored row by row (28 rows of 28 pixels).
    pub images: Vec<f64>,
    /// Class labels 0..9 (see [`CLASS_NAMES`]), n values.
    pub labels: Vec<u8>,
}

impl FashionMnist {
    /// The 784 pixels of image `i`, or `None` when `i >= n`.
    pub fn image(&self, i: usize) -> Option<&[f64]> {
        self.images.get(i * PIXELS..(i + 1) * PIXELS)
    }
}

/// Read a file, check its SHA-256 and return its bytes.
fn read_verified(path: &Path, expected_sha256: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        ModelError::InvalidData(format!(
            "cannot read Fashion-MNIST file {}: {e}",
            path.display()
        ))
    })?;
    let digest = Sha256::digest(&bytes);
    let got: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if got != expected_sha256 {
        return Err(ModelError::InvalidData(format!(
            "SHA-256 checksum mismatch for {}: expected {expected_sha256}, got {got} \
             (the file is corrupted or not the official Fashion-MNIST file)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Read exactly `buf.len()` decompressed bytes.
fn read_exact(dec: &mut impl Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    dec.read_exact(buf).map_err(|e| {
        ModelError::InvalidData(format!(
            "cannot decompress the {what} of {}: {e}",
            path.display()
        ))
    })
}

/// Read `k` big-endian u32 header fields.
fn read_header(dec: &mut impl Read, k: usize, path: &Path) -> Result<Vec<u32>> {
    let mut buf = vec![0u8; 4 * k];
    read_exact(dec, &mut buf, path, "IDX header")?;
    Ok(buf
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Load the first `n` examples of a split from `dir`, which must hold the
/// official gzip-compressed IDX files under their official names.
///
/// Both files of the split are read whole and their SHA-256 checked against
/// the official files' before anything is decoded; then the IDX headers are
/// checked (magic numbers 2051 and 2049, 60,000 or 10,000 examples, 28×28
/// pixels, equal counts) and only the first n examples are decompressed.
/// `n = 0` gives an empty set.
///
/// Errors ([`ModelError::InvalidData`], each naming the file): a missing or
/// unreadable file, a checksum mismatch, a malformed header or truncated
/// data, a label outside 0..9, and `n` larger than the split.
pub fn load(dir: &Path, split: Split, n: usize) -> Result<FashionMnist> {
    let ((img_name, img_sha), (lab_name, lab_sha)) = split.files();
    let img_path: PathBuf = dir.join(img_name);
    let lab_path: PathBuf = dir.join(lab_name);
    let img_bytes = read_verified(&img_path, img_sha)?;
    let lab_bytes = read_verified(&lab_path, lab_sha)?;

    let mut img = GzDecoder::new(img_bytes.as_slice());
    let h = read_header(&mut img, 4, &img_path)?;
    if h[0] != IMAGES_MAGIC {
        return Err(ModelError::InvalidData(format!(
            "{}: IDX magic number {} is not {IMAGES_MAGIC} (an image file)",
            img_path.display(),
            h[0]
        )));
    }
    let count = h[1] as usize;
    if count != split.num_examples() || h[2] as usize != ROWS || h[3] as usize != COLS {
        return Err(ModelError::InvalidData(format!(
            "{}: header says {} images of {}×{}, expected {} of {ROWS}×{COLS}",
            img_path.display(),
            h[1],
            h[2],
            h[3],
            split.num_examples()
        )));
    }

    let mut lab = GzDecoder::new(lab_bytes.as_slice());
    let h = read_header(&mut lab, 2, &lab_path)?;
    if h[0] != LABELS_MAGIC {
        return Err(ModelError::InvalidData(format!(
            "{}: IDX magic number {} is not {LABELS_MAGIC} (a label file)",
            lab_path.display(),
            h[0]
        )));
    }
    if h[1] as usize != count {
        return Err(ModelError::InvalidData(format!(
            "{}: {} labels for {count} images",
            lab_path.display(),
            h[1]
        )));
    }

    if n > count {
        return Err(ModelError::InvalidData(format!(
            "asked for {n} examples but the {split:?} split has only {count}"
        )));
    }

    let mut pixels = vec![0u8; n * PIXELS];
    read_exact(&mut img, &mut pixels, &img_path, "pixels")?;
    let mut labels = vec![0u8; n];
    read_exact(&mut lab, &mut labels, &lab_path, "labels")?;
    if let Some(i) = labels.iter().position(|&l| l as usize >= CLASS_NAMES.len()) {
        return Err(ModelError::InvalidData(format!(
            "{}: label {i} is {}, outside 0..9",
            lab_path.display(),
            labels[i]
        )));
    }
    Ok(FashionMnist {
        n,
        images: pixels.iter().map(|&p| f64::from(p) / 255.0).collect(),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist")
    }

    /// A fresh, unique folder under the system temp dir (removed by the test).
    fn unique_temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "avi-fashion-mnist-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Shape, pixel range and known values of the first training examples.
    /// The first image's pixel bytes sum to 76,247 (checked with Python's
    /// gzip module); its scaled sum 76247/255 is compared with tolerance
    /// 1e-9, far above the rounding of 784 f64 additions (~1e-12) but below
    /// the 1/255 that one changed byte would cause.
    #[test]
    fn loads_first_train_images() {
        let data = load(&data_dir(), Split::Train, 5).unwrap();
        assert_eq!(data.n, 5);
        assert_eq!(data.images.len(), 5 * PIXELS);
        assert_eq!(data.labels.len(), 5);
        assert!(data.images.iter().all(|p| (0.0..=1.0).contains(p)));
        assert_eq!(data.labels, vec![9, 0, 0, 3, 0]);
        assert_eq!(CLASS_NAMES[data.labels[0] as usize], "Ankle boot");
        let first: f64 = data.image(0).unwrap().iter().sum();
        assert!((first - 76_247.0 / 255.0).abs() <= 1e-9, "{first}");
        assert!(data.image(5).is_none());
        // Some pixel is fully dark and some fully bright (255 → exactly 1).
        assert!(data.images.iter().any(|&p| p <= 0.0));
        assert!(data.images.iter().any(|&p| p >= 1.0));
    }

    /// The test split loads too, and asking for more than it holds fails.
    #[test]
    fn test_split_and_too_many() {
        let data = load(&data_dir(), Split::Test, 3).unwrap();
        assert_eq!(data.labels, vec![9, 2, 1]);
        let err = load(&data_dir(), Split::Test, 10_001).unwrap_err();
        assert!(err.to_string().contains("10001"), "{err}");
        assert!(load(&data_dir(), Split::Test, 0).unwrap().images.is_empty());
    }

    /// A copy with one flipped byte fails the checksum, naming the file.
    #[test]
    fn corrupted_copy_fails_checksum() {
        let dir = unique_temp_dir("corrupt");
        for name in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
            std::fs::copy(data_dir().join(name), dir.join(name)).unwrap();
        }
        let path = dir.join("t10k-images-idx3-ubyte.gz");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        let result = load(&dir, Split::Test, 5);
        let _ = std::fs::remove_dir_all(&dir);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("SHA-256 checksum mismatch"), "{err}");
        assert!(err.contains("t10k-images-idx3-ubyte.gz"), "{err}");
    }

    /// A missing folder gives an error that names the missing file's path.
    #[test]
    fn missing_dir_errors() {
        let dir = std::env::temp_dir().join(format!(
            "avi-fashion-mnist-missing-{}-does-not-exist",
            std::process::id()
        ));
        let err = load(&dir, Split::Train, 5).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }
}
