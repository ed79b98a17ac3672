package bundle

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/bangerdev/banger/internal/errdefs"
)

// Source is where a bundle is read from: Open returns its bytes from
// offset on, exactly (an HTTP Range request, a file's seek; a server that
// ignores the range must be caught by the Source, not passed on); Size is
// its length (-1 when unknown).
type Source interface {
	Open(ctx context.Context, offset int64) (io.ReadCloser, error)
	Size() int64
}

// InstallOptions says what the caller expects of a bundle.
type InstallOptions struct {
	// Kind, Name and Version the manifest must have ("" accepts any).
	Kind, Name, Version string
	// Arch the manifest must have ("" = this host's, runtime.GOARCH).
	Arch string
	// SHA256 of the compressed bundle (a catalog entry's sha256); checked
	// when set.
	SHA256 string
	// MaxBytes, when positive, bounds the total size of the files the
	// manifest lists (a small bundle can expand to a huge file of zeros).
	MaxBytes int64
	// Progress, when set, is called with the compressed bytes read so far
	// and Source.Size().
	Progress func(done, total int64)
}

// checkpointName is the file in the install directory recording where a
// resumed Install starts.
const checkpointName = ".bundle-install.json"

// checkpoint is a point of the stream where Install can resume: the start
// of a frame, in a file's content or between entries.
type checkpoint struct {
	Bundle    string    `json:"bundle"` // InstallOptions.SHA256
	Size      int64     `json:"size"`   // Source.Size()
	Next      int64     `json:"next"`   // compressed offset of the next frame
	BundleSum []byte    `json:"bundle_sum,omitempty"`
	Manifest  *Manifest `json:"manifest"`
	Done      []string  `json:"done"`
	// Current is the file being written ("" between entries), Offset how
	// much of it is written and Sum the sha256 state of that much.
	Current string `json:"current,omitempty"`
	Offset  int64  `json:"offset,omitempty"`
	Sum     []byte `json:"sum,omitempty"`
}

// Install reads the bundle from src into dir (which must exist; the
// caller removes it on failure), returning its manifest once every file is
// written and verified. It resumes from the checkpoint a failed Install
// left in dir. Errors of a bundle that doesn't match its manifest, the
// options or the tar and zstd formats match ErrCorrupt and
// errdefs.ErrInvalid.
func Install(ctx context.Context, src Source, dir string, opts InstallOptions) (*Manifest, error) {
	in := &installer{opts: opts, src: src, checkpointEvery: time.Second}
	return in.install(ctx, dir)
}

type installer struct {
	opts            InstallOptions
	src             Source
	root            *os.Root
	checkpointEvery time.Duration

	m     *Manifest
	files map[string]*File
	done  map[string]bool
	s     *stream
	hs    *hasher

	safe      *checkpoint // the last point Install can resume from
	written   *checkpoint // the last one written to the file
	writtenAt time.Time
}

func (in *installer) install(ctx context.Context, dir string) (*Manifest, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("install bundle: %w", err)
	}
	defer root.Close()
	in.root = root
	start, err := in.loadCheckpoint()
	if err != nil {
		return nil, err
	}
	var bundleSum hash.Hash
	if in.opts.SHA256 != "" {
		bundleSum = sha256.New()
		if start.BundleSum != nil {
			if err := bundleSum.(encoding.BinaryUnmarshaler).UnmarshalBinary(start.BundleSum); err != nil {
				return nil, fmt.Errorf("install bundle: checkpoint: %w", err)
			}
		}
	}
	rc, err := in.src.Open(ctx, start.Next)
	if err != nil {
		return nil, fmt.Errorf("open bundle at offset %d: %w", start.Next, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	var progress func(int64)
	if in.opts.Progress != nil {
		total := in.src.Size()
		progress = func(done int64) { in.opts.Progress(done, total) }
		progress(start.Next)
	}
	in.s = startDecoding(ctx, rc, start.Next, bundleSum, progress)
	defer func() {
		cancel()
		rc.Close()
		in.s.wait()
	}()
	in.hs = startHasher(in)
	in.s.recycle = in.hs.recycle
	err = in.run(ctx, start)
	in.hs.close() // in.safe is final once it has summed all it was given
	if err != nil {
		if in.safe != nil && in.safe != in.written {
			if werr := in.writeCheckpoint(in.safe); werr != nil {
				err = errors.Join(err, werr)
			}
		}
		return nil, err
	}
	if err := root.Remove(checkpointName); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("install bundle: %w", err)
	}
	return in.m, nil
}

// loadCheckpoint reads dir's checkpoint (a zero one, at offset 0, when
// there is none).
func (in *installer) loadCheckpoint() (*checkpoint, error) {
	ck := &checkpoint{Bundle: in.opts.SHA256, Size: in.src.Size()}
	data, err := in.root.ReadFile(checkpointName)
	if errors.Is(err, fs.ErrNotExist) {
		return ck, nil
	}
	if err != nil {
		return nil, fmt.Errorf("install bundle: checkpoint: %w", err)
	}
	var old checkpoint
	err = json.Unmarshal(data, &old)
	if err == nil && old.Manifest == nil {
		err = errors.New("no manifest")
	}
	if err != nil {
		return nil, fmt.Errorf("install bundle: unreadable checkpoint %s; remove the directory and start again: %w: %w", checkpointName, err, errdefs.ErrFailedPrecondition)
	}
	if old.Bundle != ck.Bundle || old.Size != ck.Size {
		return nil, fmt.Errorf("install bundle: the directory holds a partial install of another bundle (sha256 %q, %d bytes); remove it and start again: %w", old.Bundle, old.Size, errdefs.ErrFailedPrecondition)
	}
	if err := in.setManifest(old.Manifest); err != nil {
		return nil, err
	}
	for _, p := range old.Done {
		in.done[p] = true
	}
	return &old, nil
}

func (in *installer) setManifest(m *Manifest) error {
	if err := m.Validate(true); err != nil {
		return fmt.Errorf("bundle: %w", errors.Join(err, corruptErr{}))
	}
	o := in.opts
	arch := o.Arch
	if arch == "" {
		arch = runtime.GOARCH
	}
	if o.Kind != "" && m.Kind != o.Kind || o.Name != "" && m.Name != o.Name || o.Version != "" && m.Version != o.Version || m.Arch != arch {
		wantName := cmpOr(o.Name, "NAME") + "@" + cmpOr(o.Version, "VERSION")
		return fmt.Errorf("bundle holds %s %s@%s for %s, want %s %s for %s: %w",
			m.Kind, m.Name, m.Version, m.Arch, cmpOr(o.Kind, "a bundle"), wantName, arch, errdefs.ErrInvalid)
	}
	if o.MaxBytes > 0 {
		var total int64
		for _, f := range m.Files {
			if f.Size > o.MaxBytes-total {
				return fmt.Errorf("bundle %s@%s holds more than the %d bytes of files allowed: %w", m.Name, m.Version, o.MaxBytes, errdefs.ErrInvalid)
			}
			total += f.Size
		}
	}
	in.m = m
	in.files = map[string]*File{}
	in.done = map[string]bool{}
	for i := range m.Files {
		in.files[m.Files[i].Path] = &m.Files[i]
	}
	return nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func (in *installer) run(ctx context.Context, start *checkpoint) error {
	if start.Next == 0 {
		if err := in.readManifest(); err != nil {
			return err
		}
		in.mark(nil, 0, nil)
	} else if start.Current != "" {
		f := in.files[start.Current]
		if f == nil {
			return fmt.Errorf("install bundle: checkpoint names %s, not in the manifest: %w", errdefs.Quote(start.Current), errdefs.ErrFailedPrecondition)
		}
		h := sha256.New()
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(start.Sum); err != nil {
			return fmt.Errorf("install bundle: checkpoint: %w", err)
		}
		out, err := in.root.OpenFile(f.Path, os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("install bundle: resume %s: %w", f.Path, err)
		}
		if err := out.Truncate(start.Offset); err != nil {
			out.Close()
			return fmt.Errorf("install bundle: resume %s: %w", f.Path, err)
		}
		if err := in.content(ctx, f, out, start.Offset, h); err != nil {
			return err
		}
	}
	for {
		hdr, err := in.header()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if err := in.entry(ctx, hdr); err != nil {
			return err
		}
	}
	var missing []string
	for _, f := range in.m.Files {
		if !in.done[f.Path] {
			missing = append(missing, f.Path)
		}
	}
	if len(missing) > 0 {
		return corrupt("the archive lacks files its manifest lists: %s", strings.Join(missing, ", "))
	}
	// The tar stream may be followed by padding: read the stream to its end,
	// so its frames are all checked and the bundle's size and sum known.
	if _, err := io.Copy(io.Discard, in.s); err != nil {
		return err
	}
	if total := in.src.Size(); total >= 0 && in.s.offset() != total {
		return corrupt("the bundle ends at byte %d, its source said %d bytes", in.s.offset(), total)
	}
	if in.opts.SHA256 != "" {
		if sum := hex.EncodeToString(in.s.sum.Sum(nil)); sum != in.opts.SHA256 {
			return corrupt("the bundle's sha256 is %s, expected %s", sum, in.opts.SHA256)
		}
	}
	return nil
}

// header reads the next entry's header; io.EOF at the archive's end marker.
func (in *installer) header() (*tar.Header, error) {
	var blk [512]byte
	if _, err := io.ReadFull(in.s, blk[:]); err != nil {
		return nil, in.truncated(err, "the archive ends before its end marker")
	}
	if blk == [512]byte{} {
		return nil, io.EOF
	}
	hdr, err := tar.NewReader(io.MultiReader(bytes.NewReader(blk[:]), in.s)).Next()
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, in.truncated(err, "read a tar header")
	}
	return hdr, nil
}

// truncated turns an early end of the stream into a corrupt-bundle error.
func (in *installer) truncated(err error, what string) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return corrupt("%s: truncated archive (at byte %d of the bundle)", what, in.s.offset())
	}
	if errors.Is(err, tar.ErrHeader) || errors.Is(err, tar.ErrFieldTooLong) || errors.Is(err, tar.ErrInsecurePath) {
		return corrupt("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (in *installer) readManifest() error {
	hdr, err := in.header()
	if errors.Is(err, io.EOF) {
		return corrupt("empty archive: no %s", ManifestName)
	}
	if err != nil {
		return err
	}
	if hdr.Name != ManifestName || hdr.Typeflag != tar.TypeReg {
		return corrupt("the archive's first entry is %s, not %s: not a banger bundle", errdefs.Quote(hdr.Name), ManifestName)
	}
	if hdr.Size > MaxManifestSize {
		return corrupt("%s is %d bytes, more than %d", ManifestName, hdr.Size, MaxManifestSize)
	}
	data := make([]byte, hdr.Size)
	if _, err := io.ReadFull(in.s, data); err != nil {
		return in.truncated(err, "read "+ManifestName)
	}
	if err := in.skipPadding(hdr.Size); err != nil {
		return err
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return corrupt("%s: %w", ManifestName, err)
	}
	return in.setManifest(&m)
}

func (in *installer) skipPadding(size int64) error {
	if pad := -size & 511; pad > 0 {
		if _, err := io.CopyN(io.Discard, in.s, pad); err != nil {
			return in.truncated(err, "read the padding of an entry")
		}
	}
	return nil
}

func (in *installer) entry(ctx context.Context, hdr *tar.Header) error {
	name := strings.TrimSuffix(hdr.Name, "/")
	if hdr.Typeflag == tar.TypeDir {
		if err := checkPath(name); err != nil {
			return corrupt("archive entry: %w", err)
		}
		if err := in.root.MkdirAll(name, 0o755); err != nil {
			return fmt.Errorf("install bundle: %w", err)
		}
		return in.skipPadding(hdr.Size)
	}
	if hdr.Typeflag != tar.TypeReg {
		return corrupt("archive entry %s: type %q is not allowed in a bundle (only regular files and directories)", errdefs.Quote(hdr.Name), hdr.Typeflag)
	}
	f := in.files[hdr.Name]
	switch {
	case f == nil:
		return corrupt("archive entry %s is not in the manifest", errdefs.Quote(hdr.Name))
	case in.done[f.Path]:
		return corrupt("archive entry %s appears twice", errdefs.Quote(hdr.Name))
	case hdr.Size != f.Size:
		return corrupt("%s: the archive holds %d bytes, the manifest says %d", f.Path, hdr.Size, f.Size)
	}
	if d := path.Dir(f.Path); d != "." {
		if err := in.root.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("install bundle: %w", err)
		}
	}
	out, err := in.root.OpenFile(f.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("install bundle: %w", err)
	}
	return in.content(ctx, f, out, 0, sha256.New())
}

// content writes f's content from off on into out (closing it), checks its
// sum, and reads the entry's padding.
func (in *installer) content(ctx context.Context, f *File, out *os.File, off int64, h hash.Hash) error {
	defer out.Close()
	for off < f.Size {
		if err := ctx.Err(); err != nil {
			return err
		}
		b, err := in.s.peek(f.Size - off)
		if err != nil {
			return in.truncated(err, "read "+f.Path)
		}
		if err := writeSparse(out, b, off); err != nil {
			return fmt.Errorf("install bundle: write %s: %w", f.Path, err)
		}
		in.hs.write(h, b)
		in.s.advance(len(b))
		off += int64(len(b))
		if in.s.atFrameEnd() {
			in.mark(f, off, h)
		}
	}
	if sum := hex.EncodeToString(in.hs.sum(h)); sum != f.SHA256 {
		return corrupt("%s: sha256 %s, the manifest says %s", f.Path, sum, f.SHA256)
	}
	mode := f.Mode
	if mode == 0 {
		mode = 0o644
	}
	if err := out.Truncate(f.Size); err != nil {
		return fmt.Errorf("install bundle: %w", err)
	}
	if err := out.Chmod(fs.FileMode(mode)); err != nil {
		return fmt.Errorf("install bundle: %w", err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("install bundle: %w", err)
	}
	in.done[f.Path] = true
	if err := in.skipPadding(f.Size); err != nil {
		return err
	}
	if in.s.atFrameEnd() {
		in.mark(nil, 0, nil)
	}
	return nil
}

// mark records the current point (just after a frame) as the resume
// point: in f's content at off with h's state, or between entries when f
// (and h) is nil. The checkpoint file is written at most every
// checkpointEvery, and on failure.
func (in *installer) mark(f *File, off int64, h hash.Hash) {
	ck := &checkpoint{Bundle: in.opts.SHA256, Size: in.src.Size(), Next: in.s.offset(), Manifest: in.m}
	ck.BundleSum = in.s.c.sum // the state at the end of the frame
	for p := range in.done {
		ck.Done = append(ck.Done, p)
	}
	slices.Sort(ck.Done)
	if f != nil {
		ck.Current, ck.Offset = f.Path, off
	}
	// The hasher adds the file's sum state once it has summed up to here.
	in.hs.checkpoint(ck, h)
}

func (in *installer) writeCheckpoint(ck *checkpoint) error {
	data, err := json.Marshal(ck)
	if err != nil {
		return err
	}
	tmp := checkpointName + ".tmp"
	if err := in.root.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("install bundle: write checkpoint: %w", err)
	}
	if err := in.root.Rename(tmp, checkpointName); err != nil {
		return fmt.Errorf("install bundle: write checkpoint: %w", err)
	}
	in.written, in.writtenAt = ck, time.Now()
	return nil
}

// blockSize is the unit of holes: an aligned block of zeros this large is
// not written.
const blockSize = 4096

var zeroBlock [blockSize]byte

// writeSparse writes b at off in out, leaving aligned zero blocks as holes
// (out holds nothing past off: it was truncated there).
func writeSparse(out *os.File, b []byte, off int64) error {
	start := 0 // first byte of the run to write
	i := 0
	for i < len(b) {
		// The block holding b[i]: up to the next aligned boundary.
		end := min(len(b), i+blockSize-int((off+int64(i))%blockSize))
		if bytes.Equal(b[i:end], zeroBlock[:end-i]) {
			if start < i {
				if _, err := out.WriteAt(b[start:i], off+int64(start)); err != nil {
					return err
				}
			}
			start = end
		}
		i = end
	}
	if start < len(b) {
		_, err := out.WriteAt(b[start:], off+int64(start))
		return err
	}
	return nil
}
