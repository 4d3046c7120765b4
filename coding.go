package caddysse

// coding is a content coding the plugin writes a stream with: the one
// enum for negotiation, encoders, shared compressors and metrics labels.
type coding uint8

const (
	codingIdentity coding = iota // sent as it is
	codingGzip
	codingZstd
	codingBr
	numCodings
)

var codingNames = [numCodings]string{"identity", "gzip", "zstd", "br"}

// String is the coding's name in Content-Encoding and in metrics labels.
func (c coding) String() string { return codingNames[c] }

// parseCoding is the coding of a name the plugin can write.
func parseCoding(name string) (coding, bool) {
	for c, n := range codingNames {
		if n == name {
			return coding(c), true
		}
	}
	return codingIdentity, false
}
