//! Rows to Parquet: the seed's columns (docs/lakehouse.md), sorted by
//! path, zstd, row groups of [`ROW_GROUP_ROWS`], files of at most
//! [`FILE_ROWS`] written in parallel, each first under a hidden temporary
//! name and renamed once complete and synced: a reader never sees a
//! partial file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, StringBuilder, TimestampMicrosecondBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::WriterProperties;

use crate::names::Names;
use crate::state::Named;
use crate::LakehouseError;

/// Rows per row group: DuckDB's own row group size, so one of its
/// threads takes one group.
pub const ROW_GROUP_ROWS: usize = 122_880;
/// Rows per file at most (files are written in parallel, one per thread).
pub const FILE_ROWS: usize = 8 * ROW_GROUP_ROWS;
/// zstd level: 1 writes ~3x faster than the default 3 for a few percent
/// more bytes on these columns (docs/decisions.md D47).
const ZSTD_LEVEL: i32 = 1;

/// The index's columns (the seed's, then what a query needs besides).
pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("inode", DataType::UInt64, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("filename", DataType::Utf8, false),
        Field::new("parent_path", DataType::Utf8, false),
        Field::new("owner_uid", DataType::UInt32, false),
        Field::new("owner_name", DataType::Utf8, false),
        Field::new("group_gid", DataType::UInt32, false),
        Field::new("group_name", DataType::Utf8, false),
        Field::new("size_bytes", DataType::UInt64, false),
        Field::new("blocks_stored", DataType::UInt64, false),
        Field::new("mtime", ts.clone(), false),
        Field::new("ctime", ts.clone(), false),
        Field::new("file_type", DataType::Utf8, false),
        Field::new("is_replicated", DataType::Boolean, true),
        Field::new("atime", ts, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("mode", DataType::UInt32, false),
        Field::new("nlink", DataType::UInt32, false),
        Field::new("parent_inode", DataType::UInt64, false),
        Field::new("bytes_mapped", DataType::UInt64, false),
    ]))
}

/// The kind column: what `find -type` calls it.
pub fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFBLK => "block",
        libc::S_IFCHR => "char",
        _ => "other",
    }
}

/// Extensions longer than this are not one (`file_type` is then empty).
const EXTENSION_CHARS_MAX: usize = 16;

/// The file_type column: a regular file's extension, lower case, without
/// the dot ("" when it has none); the kind for anything else.
pub fn file_type(mode: u32, filename: &str) -> String {
    if mode & libc::S_IFMT != libc::S_IFREG {
        return match kind_name(mode) {
            "dir" => "directory".into(),
            k => k.into(),
        };
    }
    match filename.rfind('.') {
        Some(i) if i > 0 && i + 1 < filename.len() => {
            let ext = &filename[i + 1..];
            if ext.chars().count() <= EXTENSION_CHARS_MAX && !ext.contains(char::is_whitespace) {
                ext.to_lowercase()
            } else {
                String::new()
            }
        }
        _ => String::new(),
    }
}

fn micros(ns: i64) -> i64 {
    ns.div_euclid(1000)
}

/// One record batch of `rows`.
fn batch(rows: &[Named<'_>], names: &mut Names) -> Result<RecordBatch, LakehouseError> {
    let n = rows.len();
    let mut inode = UInt64Builder::with_capacity(n);
    let mut path = StringBuilder::with_capacity(n, n * 48);
    let mut filename = StringBuilder::with_capacity(n, n * 16);
    let mut parent_path = StringBuilder::with_capacity(n, n * 32);
    let mut uid = UInt32Builder::with_capacity(n);
    let mut owner = StringBuilder::with_capacity(n, n * 8);
    let mut gid = UInt32Builder::with_capacity(n);
    let mut group = StringBuilder::with_capacity(n, n * 8);
    let mut size = UInt64Builder::with_capacity(n);
    let mut stored = UInt64Builder::with_capacity(n);
    let mut mtime = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut ctime = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut ftype = StringBuilder::with_capacity(n, n * 4);
    let mut replicated = BooleanBuilder::with_capacity(n);
    let mut atime = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut kind = StringBuilder::with_capacity(n, n * 4);
    let mut mode = UInt32Builder::with_capacity(n);
    let mut nlink = UInt32Builder::with_capacity(n);
    let mut parent = UInt64Builder::with_capacity(n);
    let mut mapped = UInt64Builder::with_capacity(n);
    for r in rows {
        let m = r.meta;
        let name = &r.path[r.name_at..];
        inode.append_value(r.ino);
        path.append_value(&r.path);
        filename.append_value(name);
        // The parent's path: everything before the last '/', "/" at the top.
        let pp = &r.path[..r.name_at.saturating_sub(1)];
        parent_path.append_value(if pp.is_empty() { "/" } else { pp });
        uid.append_value(m.uid);
        owner.append_value(names.user(m.uid));
        gid.append_value(m.gid);
        group.append_value(names.group(m.gid));
        size.append_value(m.size);
        stored.append_value(m.stored);
        mapped.append_value(m.allocated);
        mtime.append_value(micros(m.mtime));
        ctime.append_value(micros(m.ctime));
        ftype.append_value(file_type(m.mode, name));
        // No cross-site replication exists yet: unknown, not false.
        replicated.append_null();
        atime.append_value(micros(m.atime));
        kind.append_value(kind_name(m.mode));
        mode.append_value(m.mode);
        nlink.append_value(m.nlink);
        parent.append_value(r.parent);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(inode.finish()),
        Arc::new(path.finish()),
        Arc::new(filename.finish()),
        Arc::new(parent_path.finish()),
        Arc::new(uid.finish()),
        Arc::new(owner.finish()),
        Arc::new(gid.finish()),
        Arc::new(group.finish()),
        Arc::new(size.finish()),
        Arc::new(stored.finish()),
        Arc::new(mtime.finish()),
        Arc::new(ctime.finish()),
        Arc::new(ftype.finish()),
        Arc::new(replicated.finish()),
        Arc::new(atime.finish()),
        Arc::new(kind.finish()),
        Arc::new(mode.finish()),
        Arc::new(nlink.finish()),
        Arc::new(parent.finish()),
        Arc::new(mapped.finish()),
    ];
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// Writes `rows` (sorted by path) as one Parquet file at `dest`, through a
/// hidden temporary beside it.
fn write_file(dest: &Path, rows: &[Named<'_>]) -> Result<u64, LakehouseError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| LakehouseError::Io { path: p, source }
    };
    let f = File::create(&tmp).map_err(io(&tmp))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_sorting_columns(Some(vec![SortingColumn {
            column_idx: 1,
            descending: false,
            nulls_first: false,
        }]))
        .build();
    let mut w = ArrowWriter::try_new(f, schema(), Some(props))?;
    let mut names = Names::default();
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        w.write(&batch(chunk, &mut names)?)?;
    }
    let f = w.into_inner()?;
    f.sync_all().map_err(io(&tmp))?;
    let bytes = f.metadata().map_err(io(&tmp))?.len();
    drop(f);
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(bytes)
}

/// The files of one generation, relative to the lakehouse directory.
pub struct Written {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// `(year, month, day)` of a Unix time in seconds (UTC).
pub fn civil_date(unix_s: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days-to-civil.
    let z = unix_s.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes generation `gen` of the index under `root` (the lakehouse
/// directory): `index/year=Y/month=M/day=D/metadata_<gen>_<n>.parquet`,
/// the date being the flush's, `threads` files at a time.
pub fn write_generation(
    root: &Path,
    gen: u64,
    unix_s: i64,
    rows: &[Named<'_>],
    threads: usize,
) -> Result<Written, LakehouseError> {
    let (y, m, d) = civil_date(unix_s);
    let rel = PathBuf::from(format!("index/year={y}/month={m:02}/day={d:02}"));
    let dir = root.join(&rel);
    std::fs::create_dir_all(&dir).map_err(|source| LakehouseError::Io {
        path: dir.clone(),
        source,
    })?;
    // An empty namespace still has a file (with the schema), so a query
    // over the index answers with no rows rather than failing.
    let chunks: Vec<&[Named<'_>]> = if rows.is_empty() {
        vec![rows]
    } else {
        rows.chunks(FILE_ROWS).collect()
    };
    let files: Vec<PathBuf> = (0..chunks.len())
        .map(|i| rel.join(format!("metadata_{gen:08}_{:05}.parquet", i + 1)))
        .collect();
    let threads = threads.clamp(1, chunks.len());
    let mut bytes = 0;
    for group in chunks
        .iter()
        .zip(&files)
        .collect::<Vec<_>>()
        .chunks(threads)
    {
        let results: Vec<Result<u64, LakehouseError>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|(rows, f)| {
                    let dest = root.join(f);
                    s.spawn(move || write_file(&dest, rows))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(LakehouseError::Panic("parquet writer")))
                })
                .collect()
        });
        for r in results {
            bytes += r?;
        }
    }
    sync_dir(&dir)?;
    Ok(Written { files, bytes })
}

/// Makes the renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), LakehouseError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LakehouseError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_file_types() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(1_772_236_800), (2026, 2, 28));
        assert_eq!(civil_date(1_709_164_800), (2024, 2, 29));
        let reg = libc::S_IFREG | 0o644;
        assert_eq!(file_type(reg, "data.H5"), "h5");
        assert_eq!(file_type(reg, ".bashrc"), "");
        assert_eq!(file_type(reg, "Makefile"), "");
        assert_eq!(file_type(reg, "a.tar.gz"), "gz");
        assert_eq!(file_type(libc::S_IFDIR | 0o755, "x.d"), "directory");
        assert_eq!(file_type(libc::S_IFLNK | 0o777, "l.txt"), "symlink");
    }
}
