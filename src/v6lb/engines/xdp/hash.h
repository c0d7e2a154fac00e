/* v6lb XDP: Linux's jhash2 over the nftables concatenation key, as v6lb.core.flowhash.
 *
 * The key is the register nft hashes: saddr . daddr . sport . dport (40 bytes, each
 * port 2 bytes in network order then 2 zero bytes) or saddr . daddr . l4proto
 * (36 bytes, the protocol byte then 3 zero bytes), read as host (little-endian)
 * 32-bit words. jhash2(k, n, seed) == jhash(k, 4n, seed): the same mixes.
 * The table slot is reciprocal_scale(h, M) = (h * M) >> 32, never h % M.
 */
#ifndef V6LB_HASH_H
#define V6LB_HASH_H

#include <linux/types.h>

#define V6LB_JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 v6lb_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> (32 - s));
}

#define __v6lb_jhash_mix(a, b, c)                     \
	{                                             \
		a -= c; a ^= v6lb_rol32(c, 4);  c += b; \
		b -= a; b ^= v6lb_rol32(a, 6);  a += c; \
		c -= b; c ^= v6lb_rol32(b, 8);  b += a; \
		a -= c; a ^= v6lb_rol32(c, 16); c += b; \
		b -= a; b ^= v6lb_rol32(a, 19); a += c; \
		c -= b; c ^= v6lb_rol32(b, 4);  b += a; \
	}

#define __v6lb_jhash_final(a, b, c)                 \
	{                                           \
		c ^= b; c -= v6lb_rol32(b, 14); \
		a ^= c; a -= v6lb_rol32(c, 11); \
		b ^= a; b -= v6lb_rol32(a, 25); \
		c ^= b; c -= v6lb_rol32(b, 16); \
		a ^= c; a -= v6lb_rol32(c, 4);  \
		b ^= a; b -= v6lb_rol32(a, 14); \
		c ^= b; c -= v6lb_rol32(b, 24); \
	}

/* k: 10 words (4-tuple) or 9 words (3-tuple). */
static __always_inline __u32 v6lb_jhash_words(const __u32 *k, __u32 n, __u32 seed)
{
	__u32 a, b, c;

	a = b = c = V6LB_JHASH_INITVAL + (n << 2) + seed;
	/* n is 9 or 10: two or three mixes, then a tail of 3 words or 1 word */
	a += k[0]; b += k[1]; c += k[2];
	__v6lb_jhash_mix(a, b, c);
	a += k[3]; b += k[4]; c += k[5];
	__v6lb_jhash_mix(a, b, c);
	if (n == 10) {
		a += k[6]; b += k[7]; c += k[8];
		__v6lb_jhash_mix(a, b, c);
		a += k[9];
	} else {
		a += k[6]; b += k[7]; c += k[8];
	}
	__v6lb_jhash_final(a, b, c);
	return c;
}

static __always_inline __u32 v6lb_reciprocal_scale(__u32 h, __u32 n)
{
	return (__u32)(((__u64)h * n) >> 32);
}

#endif
