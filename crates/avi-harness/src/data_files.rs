//! Observation files besides JSON: CSV and NumPy `.npy`.
//!
//! - **CSV** (`.csv`): one observation per row, one column per value (one
//!   column: scalar observations; D columns: vectors of D values). A first
//!   row that is not all numbers is a header and skipped. Separators are
//!   commas; spaces around values are ignored; empty lines are skipped.
//! - **NumPy** (`.npy`, read with the `npyz` crate): a 1-D array of N
//!   scalars, or a 2-D `[N, D]` array of vectors (C or Fortran order), of
//!   float64, float32, int64, int32 or uint8 (converted to f64).
//!
//! Both give the values row-major and the vector width (`None` for
//! scalars); the caller applies the same checks as to JSON data (not
//! empty, finite). Every error names the file and where in it.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Values (row-major) and the vector width (`None`: scalars).
pub type Values = (Vec<f64>, Option<usize>);

/// Read a CSV file of observations.
pub fn read_csv(path: &Path) -> Result<Values> {
    let name = path.display();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("cannot read data file {name}"))?;
    let mut values = Vec::new();
    let mut width: Option<usize> = None;
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("data file {name}: row {}", i + 1))?;
        let parsed: Vec<Option<f64>> = record.iter().map(|f| f.parse::<f64>().ok()).collect();
        if parsed.iter().any(Option::is_none) {
            if i == 0 {
                continue; // a header row
            }
            let col = parsed.iter().position(Option::is_none).unwrap_or(0);
            bail!(
                "data file {name}: row {}, column {}: `{}` is not a number",
                i + 1,
                col + 1,
                record.get(col).unwrap_or("")
            );
        }
        match width {
            None => width = Some(parsed.len()),
            Some(w) if w != parsed.len() => bail!(
                "data file {name}: row {} has {} values, the first data row has {w}",
                i + 1,
                parsed.len()
            ),
            Some(_) => {}
        }
        values.extend(parsed.into_iter().flatten());
    }
    let width = width.unwrap_or(1);
    Ok((values, (width > 1).then_some(width)))
}

/// Read a NumPy `.npy` file of observations.
pub fn read_npy(path: &Path) -> Result<Values> {
    let name = path.display();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read data file {name}"))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(file))
        .with_context(|| format!("data file {name}: not a NumPy .npy file"))?;
    let shape: Vec<u64> = npy.shape().to_vec();
    let fortran = npy.order() == npyz::Order::Fortran;
    let dtype = npy.dtype().descr().trim_matches('\'').to_string();
    let (rows, cols) = match shape.as_slice() {
        [n] => (*n, None),
        [n, d] => (*n, Some(*d)),
        other => bail!(
            "data file {name}: an array of shape {other:?}; give [N] scalars or [N, D] vectors"
        ),
    };
    let total = rows.saturating_mul(cols.unwrap_or(1));
    if total > avi_models::MAX_DATA_VALUES as u64 {
        bail!(
            "data file {name}: {total} values is more than the largest supported, {}",
            avi_models::MAX_DATA_VALUES
        );
    }
    let read = |e: std::io::Error| anyhow::anyhow!("data file {name}: {e}");
    let values: Vec<f64> = match dtype.as_str() {
        "<f8" => npy.into_vec::<f64>().map_err(read)?,
        "<f4" => npy.into_vec::<f32>().map_err(read)?.into_iter().map(f64::from).collect(),
        "<i8" => npy.into_vec::<i64>().map_err(read)?.into_iter().map(|v| v as f64).collect(),
        "<i4" => npy.into_vec::<i32>().map_err(read)?.into_iter().map(f64::from).collect(),
        "|u1" => npy.into_vec::<u8>().map_err(read)?.into_iter().map(f64::from).collect(),
        other => bail!(
            "data file {name}: dtype `{other}` is not supported (float64, float32, int64, int32 or uint8, little-endian)"
        ),
    };
    if values.len() as u64 != total {
        bail!(
            "data file {name}: {} values for shape {shape:?}",
            values.len()
        );
    }
    let values = match (cols, fortran) {
        (Some(d), true) => {
            // Column-major [N, D] to row-major.
            let (n, d) = (rows as usize, d as usize);
            let mut out = vec![0.0; values.len()];
            for j in 0..d {
                for i in 0..n {
                    out[i * d + j] = values[j * n + i];
                }
            }
            out
        }
        _ => values,
    };
    Ok((values, cols.map(|d| d as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` file of the given dtype, shape and order, written by hand
    /// (format version 1.0) so that the reader is tested against the
    /// format, not against itself.
    fn npy(descr: &str, fortran: bool, shape: &[usize], data: &[u8]) -> Vec<u8> {
        let shape_text = match shape {
            [n] => format!("({n},)"),
            dims => format!(
                "({})",
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape_text}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn csv_scalars_vectors_headers_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.csv", b"x\n1.5\n-2\n\n3e2\n");
        assert_eq!(read_csv(&p).unwrap(), (vec![1.5, -2.0, 300.0], None));
        let p = write(dir.path(), "b.csv", b"a, b\n1, 2\n3 ,4\n");
        assert_eq!(read_csv(&p).unwrap(), (vec![1.0, 2.0, 3.0, 4.0], Some(2)));
        let p = write(dir.path(), "c.csv", b"1,2\n3\n");
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(
            e.contains("c.csv") && e.contains("row 2 has 1 values"),
            "{e}"
        );
        let p = write(dir.path(), "d.csv", b"1\n2\nx\n");
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(e.contains("d.csv") && e.contains("row 3, column 1"), "{e}");
    }

    #[test]
    fn npy_dtypes_shapes_and_orders() {
        let dir = tempfile::tempdir().unwrap();
        let f8: Vec<u8> = [1.5f64, -2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = write(dir.path(), "a.npy", &npy("<f8", false, &[3], &f8));
        assert_eq!(read_npy(&p).unwrap(), (vec![1.5, -2.0, 3.0], None));
        // [[1, 2, 3], [4, 5, 6]] as float32, C order and Fortran order.
        let c: Vec<u8> = [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = write(dir.path(), "b.npy", &npy("<f4", false, &[2, 3], &c));
        assert_eq!(
            read_npy(&p).unwrap(),
            (vec![1., 2., 3., 4., 5., 6.], Some(3))
        );
        let f: Vec<u8> = [1f32, 4., 2., 5., 3., 6.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let p = write(dir.path(), "c.npy", &npy("<f4", true, &[2, 3], &f));
        assert_eq!(
            read_npy(&p).unwrap(),
            (vec![1., 2., 3., 4., 5., 6.], Some(3))
        );
        let p = write(dir.path(), "d.npy", &npy("|u1", false, &[2], &[0, 255]));
        assert_eq!(read_npy(&p).unwrap(), (vec![0.0, 255.0], None));
        let p = write(
            dir.path(),
            "e.npy",
            &npy("<i8", false, &[1], &7i64.to_le_bytes()),
        );
        assert_eq!(read_npy(&p).unwrap(), (vec![7.0], None));
        for (name, bytes, needle) in [
            ("f.npy", npy("<c16", false, &[1], &[0; 16]), "not supported"),
            ("g.npy", npy("<f8", false, &[1, 1, 1], &[0; 8]), "shape"),
            ("h.npy", b"not numpy".to_vec(), "not a NumPy"),
            ("i.npy", npy("<f8", false, &[3], &[0; 8]), "i.npy"),
        ] {
            let p = write(dir.path(), name, &bytes);
            let e = format!("{:#}", read_npy(&p).unwrap_err());
            assert!(e.contains(needle) && e.contains(name), "{name}: {e}");
        }
    }
}
