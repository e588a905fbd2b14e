#!/usr/bin/env python3
"""Functions longer than a limit (default 150 lines), tests excluded.

Counts braces from each `fn` line to its closing brace (strings and line comments
stripped), skipping `#[cfg(test)]` modules.

    python3 scripts/long_functions.py . 150   # one line per function: length, file, line, name
"""
import os,re,sys
root=sys.argv[1]; limit=int(sys.argv[2]) if len(sys.argv)>2 else 150
out=[]
for dp,dn,fs in os.walk(root):
    if '/target' in dp or '/.git' in dp: continue
    for f in fs:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); lines=open(p).read().split('\n')
        # find test module start
        test_start=len(lines)
        for i,l in enumerate(lines):
            if re.match(r'\s*#\[cfg\(test\)\]',l) and i+1<len(lines) and re.match(r'\s*(pub(\(crate\))?\s+)?mod ',lines[i+1]): test_start=i;break
        i=0
        while i<test_start:
            m=re.match(r'\s*(pub(\([^)]*\))?\s+)?(async\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)',lines[i])
            if m:
                # find opening brace
                depth=0; started=False; j=i
                while j<len(lines):
                    s=re.sub(r'"(\\.|[^"\\])*"','""',lines[j]); s=re.sub(r"'(\\.|[^'\\])'","''",s); s=s.split('//')[0]
                    for ch in s:
                        if ch=='{': depth+=1; started=True
                        elif ch=='}': depth-=1
                    if started and depth==0: break
                    if not started and s.rstrip().endswith(';'): break
                    j+=1
                n=j-i+1
                if started and n>limit: out.append((n,os.path.relpath(p,root),i+1,m.group(6)))
                i=j+1 if started else i+1
            else: i+=1
for n,p,l,name in sorted(out,reverse=True): print(n,p,l,name)
