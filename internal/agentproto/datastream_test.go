package agentproto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestDataHandshake(t *testing.T) {
	tok := bytes.Repeat([]byte{7}, DataTokenSize)
	var b bytes.Buffer
	if err := WriteDataHello(&b, tok); err != nil {
		t.Fatal(err)
	}
	if b.Len() != len(DataHelloMagic)+DataTokenSize {
		t.Fatalf("preamble of %d bytes", b.Len())
	}
	if err := ReadDataHello(bytes.NewReader(b.Bytes()), tok); err != nil {
		t.Fatal(err)
	}
	other := bytes.Repeat([]byte{8}, DataTokenSize)
	if err := ReadDataHello(bytes.NewReader(b.Bytes()), other); !errors.Is(err, ErrDataHandshake) {
		t.Fatalf("wrong token: %v", err)
	}
	// The answer is not a preamble: a stale or reflected one fails.
	if err := ReadDataAck(bytes.NewReader(b.Bytes()), tok); !errors.Is(err, ErrDataHandshake) {
		t.Fatalf("hello read as ack: %v", err)
	}
	if err := ReadDataAck(strings.NewReader("BNGD"), tok); !errors.Is(err, ErrDataHandshake) {
		t.Fatalf("short ack: %v", err)
	}
	// A stale byte before the answer fails it.
	b.Reset()
	b.WriteByte('x')
	WriteDataAck(&b, tok)
	if err := ReadDataAck(&b, tok); !errors.Is(err, ErrDataHandshake) {
		t.Fatalf("stale byte: %v", err)
	}
}

func TestDataFrames(t *testing.T) {
	var b bytes.Buffer
	dw := NewDataWriter(&b)
	big := bytes.Repeat([]byte("x"), 100000)
	if n, err := dw.Pump(DataFrameData, bytes.NewReader(big), GuestDataChunk); err != nil || n != int64(len(big)) {
		t.Fatalf("pump: %d %v", n, err)
	}
	if _, err := io.WriteString(dw.Writer(DataFrameStderr, 4), "oops!"); err != nil {
		t.Fatal(err)
	}
	if err := dw.End(); err != nil {
		t.Fatal(err)
	}
	dr := NewDataReader(&b, 0)
	var out, errOut []byte
	frames := 0
	for {
		kind, p, err := dr.Next()
		if err != nil {
			t.Fatal(err)
		}
		frames++
		if kind == DataFrameEnd {
			break
		}
		if kind == DataFrameData {
			if len(p) > GuestDataChunk {
				t.Fatalf("frame of %d bytes", len(p))
			}
			out = append(out, p...)
		} else {
			errOut = append(errOut, p...)
		}
	}
	if !bytes.Equal(out, big) || string(errOut) != "oops!" {
		t.Fatalf("got %d bytes of stdout, stderr %q", len(out), errOut)
	}
	if want := 4 + 2 + 1; frames != want {
		t.Fatalf("%d frames, want %d", frames, want)
	}
	if _, _, err := dr.Next(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("after the end: %v", err)
	}
}

func TestDataFrameLimits(t *testing.T) {
	frame := func(kind byte, n int, pad byte) []byte {
		b := make([]byte, DataHeaderSize+n)
		PutDataHeader(b, kind, n)
		b[1] = pad
		return b
	}
	for name, tc := range map[string]struct {
		b   []byte
		max int
		err error
	}{
		"unknown kind":     {frame(9, 0, 0), 0, ErrDataFrame},
		"nonzero padding":  {frame(DataFrameData, 0, 1), 0, ErrDataFrame},
		"over the limit":   {frame(DataFrameData, 10, 0), 9, ErrDataFrame},
		"end with payload": {frame(DataFrameEnd, 1, 0), 0, ErrDataFrame},
		"empty data":       {frame(DataFrameData, 0, 0), 0, ErrDataFrame},
		"empty stderr":     {frame(DataFrameStderr, 0, 0), 0, ErrDataFrame},
		"cut payload":      {frame(DataFrameData, 10, 0)[:DataHeaderSize+5], 0, io.ErrUnexpectedEOF},
		"cut header":       {frame(DataFrameData, 0, 0)[:3], 0, io.ErrUnexpectedEOF},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := NewDataReader(bytes.NewReader(tc.b), tc.max).Next()
			if !errors.Is(err, tc.err) {
				t.Fatalf("got %v, want %v", err, tc.err)
			}
		})
	}
	// A huge claimed length is refused before anything is allocated.
	b := frame(DataFrameData, 0, 0)
	b[4], b[5], b[6], b[7] = 0xff, 0xff, 0xff, 0xff
	if _, _, err := NewDataReader(bytes.NewReader(b), 0).Next(); !errors.Is(err, ErrDataFrame) {
		t.Fatalf("4 GiB frame: %v", err)
	}
}

func TestDataStreamValidate(t *testing.T) {
	ok := &DataStream{Port: 1, Token: make([]byte, DataTokenSize)}
	if err := ok.Validate(2); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*DataStream{{Port: 2, Token: ok.Token}, {Port: -1, Token: ok.Token}, {Port: 0, Token: []byte("short")}} {
		if err := d.Validate(2); err == nil {
			t.Errorf("%+v accepted", d)
		}
	}
}
